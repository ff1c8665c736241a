"""Editing a model dispatched by accelerate (``device_map``), with edited layers offloaded.

On this CPU-only machine the offload goes to disk: the offloaded blocks' parameters are on
``meta`` between forward passes and their values are read from the offload folder by
accelerate's hooks. The edits must read and write the weights there and come out equal to
those made on the same model held in memory."""

import pytest
import torch
from test_driver import TINY as FAST

from harness.editors import editor_class
from harness.editors.hparams import load_hparams
from harness.testing import tiny_model

# blocks 1 and 2 hold the edited layers: offloaded, with block 3 (run by the target optimisation)
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def requests():
    from harness.data import load_counterfact

    return load_counterfact(limit=8)


def _editor(method, model, tok, cache_dir):
    hp = load_hparams(method, "smollm2-135m", overrides=FAST)
    return editor_class(method)(model, tok, hp, cache_dir=cache_dir, progress=False)


def _dispatched(tmp_path):
    from accelerate import dispatch_model

    model, tok = tiny_model("llama")
    return dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload")), tok


@pytest.mark.parametrize("method", ["lyaplock"])  # its queue and edit memory live per layer too
def test_edits_of_offloaded_layers_equal_the_in_memory_model_s(method, requests, tmp_path):
    from harness.placement import is_offloaded

    plain_model, tok = tiny_model("llama")
    model, _ = _dispatched(tmp_path)
    blocks = model.model.layers
    assert all(is_offloaded(blocks[i].mlp.down_proj) for i in (1, 2)) and not is_offloaded(blocks[0].mlp.down_proj)
    assert blocks[1].mlp.down_proj.weight.device.type == "meta"  # the values live in the offload map

    # separate caches: the offloaded model computes its own key statistics through the hooks
    plain = _editor(method, plain_model, tok, tmp_path / "plain")
    offloaded = _editor(method, model, tok, tmp_path / "offloaded")
    ids = tok("The mother tongue of Danielle Darrieux is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    for batch in (requests[:4], requests[4:8]):
        want, got = plain.apply_batch(batch), offloaded.apply_batch(batch)
        for layer in plain.layers:
            assert got["layers"][str(layer)]["preservation_loss"] == pytest.approx(
                want["layers"][str(layer)]["preservation_loss"], rel=1e-4)
    for layer in plain.layers:
        torch.testing.assert_close(offloaded.C0[layer], plain.C0[layer], rtol=1e-6, atol=1e-9)
        W_plain, W_off = plain.weight(layer), offloaded.weight(layer)
        assert not torch.equal(W_plain, plain.W0[layer])  # the edit changed the layer
        torch.testing.assert_close(W_off, W_plain, rtol=1e-4, atol=1e-6)
    # the forward pass reads the edited weights from the offload map: the same outputs as the
    # model edited in memory, not those of the unedited model
    with torch.no_grad():
        after, after_plain = model(ids).logits, plain_model(ids).logits
    torch.testing.assert_close(after, after_plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-5)


def test_a_saved_edit_state_restores_into_an_offloaded_model(requests, tmp_path):
    plain_model, tok = tiny_model("llama")
    plain = _editor("memit", plain_model, tok, tmp_path / "cache")
    plain.apply_batch(requests[:4])
    model, _ = _dispatched(tmp_path)
    restored = _editor("memit", model, tok, tmp_path / "cache")
    restored.load_state_dict(plain.state_dict())
    for layer in plain.layers:
        assert torch.equal(restored.weight(layer), plain.weight(layer))


def test_fine_tuning_refuses_offloaded_layers_with_the_fix(tmp_path):
    model, tok = _dispatched(tmp_path)
    hp = load_hparams("ft", "smollm2-135m", overrides={"layers": [1, 2]})
    with pytest.raises(ValueError, match=r"layers \[1, 2\] are offloaded by device_map.*keep the edited blocks"):
        editor_class("ft")(model, tok, hp, cache_dir=tmp_path, progress=False)


def test_the_wrapper_loads_with_a_device_map_and_edits_the_offloaded_layers(tmp_path):
    """``device_map`` and ``offload_folder`` reach transformers' loading through the lm-eval
    wrapper (``--model_args device_map=...`` or a run config's fields)."""
    from harness.models import MEMITLM
    from harness.placement import is_offloaded

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    common = dict(pretrained=str(tmp_path / "tiny"), edit_data="counterfact", num_edits=4, edit_batch_size=4,
                  hparams="smollm2-135m", cache_dir=str(tmp_path / "cache"), progress=False, **FAST)
    plain = MEMITLM(**common, device="cpu")
    mapped = MEMITLM(**common, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(mapped.editor.model.model.layers[2].mlp.down_proj)
    plain.apply_edits(plain.stream[:4])
    mapped.apply_edits(mapped.stream[:4])
    for layer in plain.editor.layers:
        torch.testing.assert_close(mapped.editor.weight(layer), plain.editor.weight(layer), rtol=1e-4, atol=1e-6)
