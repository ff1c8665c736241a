"""Editing engine on tiny models: target values, keys, statistics, editors, wrappers, state."""

import copy
import dataclasses
import json
import random

import pytest
import torch

from harness.arch import architecture_for
from harness.data import load_counterfact
from harness.editors import editor_class
from harness.editors.context import generate_context_templates
from harness.editors.hparams import EditHparams, load_hparams
from harness.editors.keys import compute_keys, read_at_subject, templated_prompts
from harness.editors.stats import accumulate_second_moments, load_or_compute_second_moments
from harness.editors.targets import compute_target_values
from harness.editors.tokens import subject_last_index
from harness.testing import tiny_model

FAST = dict(layers=[1, 2], v_num_grad_steps=6, stats_samples=40, stats_max_tokens=64,
            context_templates=[[6, 2]], v_lr=0.5)


@pytest.fixture(scope="module")
def requests():
    return load_counterfact(limit=80)


def make_editor(method, arch="llama", tmp_path=None, **over):
    model, tok = tiny_model(arch)
    hp = load_hparams(method, "smollm2-135m", overrides={**FAST, **over})
    return editor_class(method)(model, tok, hp, cache_dir=tmp_path, progress=False)


def test_hparams_inherit_match_and_reject_typos():
    hp = load_hparams("lyaplock", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hp.mom2_update_weight == 1000 and hp.layers == [3, 4, 5, 6, 7] and hp.alpha == 60
    assert load_hparams("memit", model_name="gpt2-xl").layers == [13, 14, 15, 16, 17]
    assert load_hparams("alphaedit", "llama3-8b").l2 == 10.0
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        load_hparams("memit", "smollm2-135m", overrides={"mom2_updat_weight": 1})
    with pytest.raises(ValueError, match="hparams="):
        load_hparams("memit", model_name="bert-base")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_target_values_equal_one_at_a_time(arch, requests):
    model, tok = tiny_model(arch)
    arch_ = architecture_for(model)
    hp = EditHparams(**{**FAST, "v_num_grad_steps": 8})
    templates = generate_context_templates(model, tok, hp.context_templates, seed=0)
    batch = requests[:4]
    together = compute_target_values(model, arch_, tok, batch, 2, templates, hp)
    for i, req in enumerate(batch):
        alone = compute_target_values(model, arch_, tok, [req], 2, templates, hp)
        assert torch.allclose(together.z_star[i], alone.z_star[0], atol=1e-4, rtol=1e-4)
        assert together.steps[i] == alone.steps[0]
    assert (together.z_star - together.z_init).norm(dim=1).min() > 0


def test_target_values_raise_the_target_probability(requests):
    """Adding z* - z_init at the subject makes target_new likelier than before."""
    model, tok = tiny_model("llama")
    arch = architecture_for(model)
    # a random tiny model has small hidden norms, so the reference's weight decay
    # ||delta|| / ||z_init||^2 would dominate: switch the regularisers off to test the NLL path
    plain = {**FAST, "v_weight_decay": 0.0, "kl_factor": 0.0, "clamp_norm_factor": 4.0}
    hp = EditHparams(**{**plain, "v_num_grad_steps": 15})
    templates = [["{}"]]
    first = compute_target_values(model, arch, tok, requests[:3], 2, templates,
                                  EditHparams(**{**plain, "v_num_grad_steps": 1}))
    tv = compute_target_values(model, arch, tok, requests[:3], 2, templates, hp)
    assert all(after < before for after, before in zip(tv.nll, first.nll))
    # the clamp holds
    assert ((tv.z_star - tv.z_init).norm(dim=1) <= 4.0 * tv.z_init.norm(dim=1) + 1e-4).all()


def test_keys_average_groups_as_memit(requests):
    model, tok = tiny_model("llama")
    arch = architecture_for(model)
    templates = [["{}"], ["A. {}", "B c. {}", "D. {}"]]
    K = compute_keys(model, arch, tok, requests[:2], [1], templates)[1]
    texts, idxs, owner, group = templated_prompts(tok, requests[:2], templates)
    per = read_at_subject(model, arch, tok, texts, idxs, [1], "key")[1]
    # request 0: bare key weighs 1/2, each of the three prefixed keys 1/6
    expected = 0.5 * per[0] + (per[1] + per[2] + per[3]) / 6
    assert torch.allclose(K[:, 0], expected, atol=1e-5)
    assert K.shape == (128, 2)


def test_second_moment_is_the_token_mean_of_k_kT_and_cached(tmp_path):
    model, tok = tiny_model("gpt2")
    arch = architecture_for(model)
    texts = ["The cat sat on the mat.", "Paris is the capital of France and a big city."]
    mom = accumulate_second_moments(model, arch, tok, [1, 3], texts, 64, progress=False)
    from harness.arch import get_module
    from harness.editors.hooks import capture
    from harness.editors.keys import read_at_subject as _unused  # noqa: F401

    keys = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        with capture({"m": get_module(model, arch.mlp_out_name(3))}, "input") as store:
            model(ids)
        keys.append(store["m"][0].double())
    K = torch.cat(keys)
    C, n = mom[3]
    assert n == K.shape[0] and C.dtype == torch.float64
    exact = K.T @ K / n
    # per-batch Gram matrices in float32, summed in float64: float32 round-off of one batch
    assert torch.allclose(C, exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    # many batches: the float64 sum adds no error of its own
    many = accumulate_second_moments(model, arch, tok, [3], texts * 40, 64, batch_tokens=16,
                                     progress=False)[3]
    assert many[1] == 40 * n and many[0].dtype == torch.float64
    assert torch.allclose(many[0], exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    first = load_or_compute_second_moments(model, arch, tok, [1], "bundled", 20, 32, tmp_path, progress=False)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and "layer1_n20_t32_tok" in files[0].name
    again = load_or_compute_second_moments(model, arch, tok, [1], "bundled", 20, 32, tmp_path, progress=False)
    assert torch.equal(first[1], again[1])


def test_statistics_sample_is_uniform_seeded_and_keyed_by_what_it_depends_on(tmp_path, monkeypatch):
    """The corpus sample is a seeded uniform draw without replacement from the whole corpus
    (Wikipedia too: never the head of a shuffle buffer); the cache key changes with the corpus's
    content (same name and size), the number of texts, the token budget and the tokenizer."""
    import datasets

    import harness.editors.stats as stats

    rows = [f"text number {i} " + "word " * (i % 7) for i in range(30_000)]
    calls = []

    def fake_load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sample = stats.corpus_texts("wikipedia", 500)
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", False)]
    expected = sorted(random.Random(1).sample(range(len(rows)), 500))
    assert sample.texts == [rows[i] for i in expected]
    assert max(expected) > 25_000 and min(expected) < 5_000  # spread over the whole corpus
    assert stats.corpus_texts("wikipedia", 500).texts == sample.texts
    assert len(set(sample.texts)) == 500
    assert sample.corpus_id.startswith("wikimedia/wikipedia-20231101.en-")

    # a file corpus: the same seeded draw, identity by content
    a, b = tmp_path / "a" / "corpus.jsonl", tmp_path / "b" / "corpus.jsonl"
    for path, word in ((a, "alpha"), (b, "gamma")):  # same name, same size, other content
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"text": f"{word} {i:04d} is a text."}) + "\n" for i in range(50)))
    assert a.stat().st_size == b.stat().st_size
    sa, sb = stats.corpus_texts(str(a), 10), stats.corpus_texts(str(b), 10)
    assert sa.texts == [f"alpha {i:04d} is a text." for i in sorted(random.Random(1).sample(range(50), 10))]
    assert sa.corpus_id != sb.corpus_id

    model, tok = tiny_model("gpt2")
    arch = architecture_for(model)
    cache = tmp_path / "cache"

    def files():
        return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.pt"))

    load_or_compute_second_moments(model, arch, tok, [1], str(a), 10, 32, cache, progress=False)
    load_or_compute_second_moments(model, arch, tok, [1], str(b), 10, 32, cache, progress=False)
    assert len(files()) == 2  # same file name and size, other content: other statistics
    load_or_compute_second_moments(model, arch, tok, [1], str(a), 20, 32, cache, progress=False)
    load_or_compute_second_moments(model, arch, tok, [1], str(a), 10, 16, cache, progress=False)
    assert len(files()) == 4
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["alpha"])  # another vocabulary
    load_or_compute_second_moments(model, arch, other_tok, [1], str(a), 10, 32, cache, progress=False)
    assert len(files()) == 5
    saved = torch.load(next(cache.rglob("*n20_t32*.pt")), weights_only=True)
    assert saved["n_texts"] == 20 and saved["max_tokens"] == 32 and saved["seed"] == 1
    assert saved["tokenizer"] == stats.tokenizer_fingerprint(tok) != stats.tokenizer_fingerprint(other_tok)


def test_statistics_texts_are_truncated_at_the_model_context_by_default(tmp_path):
    """``stats_max_tokens: null`` (every shipped config): each text is cut at the model's context
    length (the reference's choice), not at a fixed budget."""
    from harness.editors.hparams import load_hparams
    from harness.editors.stats import model_context_length

    for family in ("smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama3-8b"):
        assert load_hparams("memit", family).stats_max_tokens is None
    model, tok = tiny_model("gpt2")
    n_ctx = model_context_length(model)
    assert n_ctx == model.config.n_positions
    corpus = tmp_path / "long.jsonl"
    corpus.write_text(json.dumps({"text": "word " * (3 * n_ctx)}) + "\n")
    arch = architecture_for(model)
    load_or_compute_second_moments(model, arch, tok, [1], str(corpus), 5, None, tmp_path, progress=False)
    saved = torch.load(next(tmp_path.rglob("*.pt")), weights_only=True)
    assert saved["max_tokens"] == n_ctx and saved["tokens"] == n_ctx


@pytest.mark.parametrize("method", ["memit", "alphaedit", "lyaplock"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_editors_fit_the_residual_and_log_preservation_loss(method, arch, requests, tmp_path):
    ed = make_editor(method, arch, tmp_path, l2=1e-3, nullspace_threshold=1e9 if method == "alphaedit" else 2e-2)
    W_before = {layer: ed.weight(layer).detach().clone() for layer in ed.layers}
    rec = ed.apply_batch(requests[:3])
    assert rec["edits_done"] == 3 and set(rec["layers"]) == {"1", "2"}
    for layer in ed.layers:
        entry = rec["layers"][str(layer)]
        assert entry["update_norm"] > 0
        assert entry["preservation_loss"] > 0
        assert not torch.equal(W_before[layer], ed.weight(layer))
    if method == "lyaplock":
        assert rec["layers"]["1"]["threshold"] == pytest.approx(60 * rec["layers"]["1"]["D_base"])


def test_lyaplock_keeps_preservation_loss_in_band_where_memit_grows(requests, tmp_path):
    over = dict(mom2_update_weight=50.0, alpha=3.0, v_num_grad_steps=4, layers=[1])
    lyap = make_editor("lyaplock", "llama", tmp_path, **over)
    memit = make_editor("memit", "llama", tmp_path, **over)
    d_lyap, d_memit, thr = [], [], None
    for b in range(32):
        batch = requests[2 * b:2 * b + 2]
        rl = lyap.apply_batch(batch)["layers"]["1"]
        rm = memit.apply_batch(batch)["layers"]["1"]
        d_lyap.append(rl["preservation_loss"])
        d_memit.append(rm["preservation_loss"])
        thr = rl["threshold"]
    assert d_lyap[0] == pytest.approx(d_memit[0], rel=1e-4)  # first batch is plain MEMIT
    assert d_memit[-1] > 2 * thr  # MEMIT drifts far past the threshold
    late = d_lyap[-10:]
    assert sum(late) / len(late) < 1.5 * thr  # LyapLock hovers around it
    assert max(late) < d_memit[-1] / 2
    assert lyap.queues[1].q > 1  # the queue did raise the preservation weight


@pytest.mark.parametrize("method", ["memit", "alphaedit", "lyaplock"])
def test_state_round_trip_continues_identically(method, requests, tmp_path):
    a = make_editor(method, "llama", tmp_path)
    a.apply_batch(requests[:2])
    state = copy.deepcopy(a.state_dict())
    b = make_editor(method, "llama", tmp_path)  # a fresh, unedited model with the same seed
    b.load_state_dict(state)
    ra = a.apply_batch(requests[2:4])
    rb = b.apply_batch(requests[2:4])
    for layer in a.layers:
        assert torch.equal(a.weight(layer), b.weight(layer))
        assert ra["layers"][str(layer)]["preservation_loss"] == rb["layers"][str(layer)]["preservation_loss"]


def test_wrapper_applies_the_stream_and_registers_itself(requests, tmp_path):
    from harness import session
    from harness.models import LyapLockLM

    model, tok = tiny_model("llama")
    lm = LyapLockLM(pretrained=model, tokenizer=tok, num_edits=4, edit_batch_size=2,
                    hparams="smollm2-135m", cache_dir=str(tmp_path), progress=False,
                    **{k: v for k, v in FAST.items()})
    assert session.active_editor() is lm
    assert [r.case_id for r in lm.edited_requests] == [0, 1, 2, 3]
    assert len(lm.trace) == 2 and lm.edited_dataset == "counterfact"
    lm.apply_edits(lm.stream[4:6])
    assert lm.num_edited == 6 and lm.trace[-1]["edits_done"] == 6
    # lm-eval scoring works on the edited in-memory model
    (ll, greedy), = lm.loglikelihood([_Req(("The capital of France is", " Paris"))])
    assert ll < 0 and isinstance(greedy, bool)


class _Req:
    def __init__(self, args):
        self.args = args


def _subject_first(tok, request, subject):
    """``request`` about a one-token ``subject`` that opens its prompt: the bare prompt's subject
    ends on its first token (no BOS in this tokenizer), so that sequence has no prefix to cache."""
    assert subject_last_index(tok, request.prompt, subject) == 0
    return dataclasses.replace(request, subject=subject)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_prefix_cache_gives_the_full_sequence_result(arch, requests):
    """Running only the suffix tokens above the edit layer against a KV cache of the prefix is an
    optimisation, not an approximation; a sequence with nothing before its subject's last token
    runs whole and keeps the others on the cached path."""
    model, tok = tiny_model(arch)
    arch_ = architecture_for(model)
    hp = EditHparams(**{**FAST, "v_num_grad_steps": 5})
    templates = generate_context_templates(model, tok, hp.context_templates, seed=0)
    batch = [*requests[:3], _subject_first(tok, requests[6], "Paris")]
    fast = compute_target_values(model, arch_, tok, batch, 1, templates, hp)
    full = compute_target_values(model, arch_, tok, batch, 1, templates, hp, use_prefix_cache=False)
    assert fast.prefix_cached and not full.prefix_cached
    assert torch.allclose(fast.z_star, full.z_star, atol=1e-4, rtol=1e-4)
    assert fast.nll == pytest.approx(full.nll, rel=1e-4)


@pytest.mark.smollm
def test_lyaplock_wrapper_on_smollm2_learns_twenty_counterfact_edits():
    """The engine's acceptance on the real embedded model with the shipped defaults: the same
    lyaplock_hf wrapper and counterfact_edit task a user runs, before and after 20 edits."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness import tasks_dir
    from harness.models import LyapLockLM

    lm = LyapLockLM(num_edits=0, progress=False)
    # our tasks only: indexing lm-eval's whole catalogue took tens of seconds of this test
    manager = TaskManager(include_path=tasks_dir(), include_defaults=False)

    def efficacy(limit=None):
        out = lm_eval.simple_evaluate(model=lm, tasks=["counterfact_edit_scores"], limit=limit,
                                      task_manager=manager, log_samples=True)
        scored = [s["doc"]["case_id"] for s in out["samples"]["counterfact_edit_scores"]]
        return out["results"]["counterfact_edit_scores"]["efficacy,none"], scored

    before, scored_before = efficacy(limit=20)
    lm.apply_edits(lm.stream[:20])
    after, scored_after = efficacy()
    edited = [r.case_id for r in lm.edited_requests]
    assert sorted(scored_before) == sorted(scored_after) == sorted(edited) and len(edited) == 20
    assert before < 50.0, before
    assert after >= 90.0, f"efficacy {after:.0f} after 20 LyapLock edits (unedited {before:.0f})"
    # the queue ran: the first batch set D_base, and every batch logged D_t against the threshold
    for rec in lm.trace:
        for entry in rec["layers"].values():
            assert entry["threshold"] > 0 and entry["preservation_loss"] > 0 and entry["queue"] > 0


def _metaspace_tokenizer(prepend_scheme: str):
    """A Llama-style tokenizer: SentencePiece's '▁' marks a word's leading space, BOS first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Paris", "French", "New", "York"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for w in words:
        vocab[w] = len(vocab)
        vocab["▁" + w] = len(vocab)
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    from tokenizers.processors import TemplateProcessing

    inner.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("family", ["gpt2-bpe", "metaspace-always", "metaspace-first", "gemma"])
def test_target_tokens_get_one_leading_space_as_the_reference(family, request):
    from harness.editors.tokens import target_ids

    if family == "gpt2-bpe":  # SmolLM2's byte-level BPE, GPT-2 style ('Ġ' for a leading space)
        tok = tiny_model("llama")[1]
    elif family == "gemma":  # SentencePiece BPE, no dummy prefix: 'Paris' and ' Paris' differ
        tok = request.getfixturevalue("gemma_tokenizer")
        assert tok("Paris").input_ids[0] == tok.bos_token_id
        assert tok("Paris").input_ids[1:] != tok(" Paris").input_ids[1:]
        assert [tok.decode([i]) for i in target_ids(tok, "New York")] == [" New", " York"]
    else:
        tok = _metaspace_tokenizer("always" if family == "metaspace-always" else "first")
    for target in ("Paris", "New York"):
        reference = tok(" " + target).input_ids
        if reference[0] in {tok.bos_token_id, tok.unk_token_id} - {None}:
            reference = reference[1:]
        assert target_ids(tok, target) == reference
        # a target that already starts with a space is not given a second one
        assert target_ids(tok, " " + target) == reference
    assert tok.bos_token_id not in target_ids(tok, "Paris")


def test_narrowed_upper_blocks_give_the_rows_they_keep_unchanged(requests):
    """Narrowing to the requests still running keeps each kept row's output, in groups with a
    prefix cache and in the uncached groups of sequences that have no prefix."""
    from harness.editors import targets

    model, tok = tiny_model("llama")
    arch_ = architecture_for(model)
    templates = generate_context_templates(model, tok, FAST["context_templates"], seed=0)
    batch = [requests[0], _subject_first(tok, requests[2], "Paris"), _subject_first(tok, requests[2], "France")]
    prob = targets._prepare(model, arch_, tok, batch, 1, 3, templates, True, torch.device("cpu"))
    uncached = [g for g in prob.upper.groups if g.cache is None]
    # the bare prompts "Paris, the" and "France, the", and the essence prompts cut to the subject
    assert [len(g.rows) for g in uncached] == [2, 2]
    with torch.no_grad():
        full = prob.upper.run(prob.h_layer)
        keep = (prob.owner != 1).nonzero()[:, 0]
        prob.upper.narrow(model, arch_, 1, keep)
        narrowed = prob.upper.run(prob.h_layer)
    assert [len(g.rows) for g in prob.upper.groups if g.cache is None] == [1, 1]
    torch.testing.assert_close(narrowed[keep], full[keep])
    assert not narrowed[prob.owner == 1].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_fast_target_values_equal_the_plain_computation(arch, requests):
    """Dropping finished requests from later steps, cutting the essence prompts at the subject and
    optimising in chunks change no result beyond float round-off, nor any step count."""
    model, tok = tiny_model(arch)
    arch_ = architecture_for(model)
    # the regularisers off and a large rate, so that a random tiny model's targets do converge; the
    # early-stop threshold is the median loss after 6 steps: about half the requests stop early
    plain_hp = {**FAST, "v_weight_decay": 0.0, "kl_factor": 0.0, "clamp_norm_factor": 4.0, "v_lr": 2.0}
    templates = generate_context_templates(model, tok, FAST["context_templates"], seed=0)
    # two requests with a sequence that has no prefix: their uncached group is narrowed too
    batch = [*requests[:2], _subject_first(tok, requests[2], "Paris"), *requests[3:6],
             _subject_first(tok, requests[6], "France"),
             requests[7]]
    probe = compute_target_values(model, arch_, tok, batch, 2, templates,
                                  EditHparams(**{**plain_hp, "v_num_grad_steps": 6, "v_early_stop_loss": 0.0}))
    threshold = sorted(probe.loss)[4]
    hp = EditHparams(**{**plain_hp, "kl_factor": 0.0625, "v_num_grad_steps": 12, "v_early_stop_loss": threshold,
                        "v_batch_size": 8})
    plain = compute_target_values(model, arch_, tok, batch, 2, templates, hp, fast=False)
    from harness.editors import targets

    narrowed = []
    original_narrow = targets._UpperStack.narrow

    def spy(self, model_, arch__, layer, keep_rows):
        narrowed.append(len(keep_rows))
        return original_narrow(self, model_, arch__, layer, keep_rows)

    targets._UpperStack.narrow = spy
    try:
        fast = compute_target_values(model, arch_, tok, batch, 2, templates, hp)
    finally:
        targets._UpperStack.narrow = original_narrow
    assert narrowed and narrowed[0] < 8 * 7, narrowed  # finished requests left the upper blocks
    chunked = compute_target_values(model, arch_, tok, batch, 2, templates, EditHparams(**{**hp.to_dict(), "v_batch_size": 3}))
    assert len(set(plain.steps)) > 1, plain.steps  # some requests stop early: compaction ran
    for other in (fast, chunked):
        assert other.steps == plain.steps
        torch.testing.assert_close(other.z_star, plain.z_star, atol=2e-5, rtol=2e-5)
        assert other.loss == pytest.approx(plain.loss, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staged_forward_reads_what_a_full_pass_reads_while_the_layers_are_written(arch, requests):
    """Keys and hidden states read layer after layer, each read starting from the block input the
    previous one saved, equal a full pass on the model as it is at that moment."""
    from harness.arch import get_module
    from harness.editors.keys import StagedForward, bare_prompts, read_at_subject

    model, tok = tiny_model(arch)
    arch_ = architecture_for(model)
    templates = [["{}"], ["A. {}", "B c. {}"]]
    texts, idxs, _, _ = templated_prompts(tok, requests[:5], templates)
    keys_pass = StagedForward(model, arch_, tok, texts, idxs, batch_size=4)
    bare = bare_prompts(tok, requests[:5])
    bare_pass = StagedForward(model, arch_, tok, *bare, batch_size=3)
    generator = torch.Generator().manual_seed(0)
    for layer in (1, 2, 3):
        got = keys_pass.read("key", layer, resume_from=layer)
        assert torch.equal(got, read_at_subject(model, arch_, tok, texts, idxs, [layer], "key")[layer])
        hidden = bare_pass.read("hidden", 3, resume_from=layer)
        assert torch.equal(hidden, read_at_subject(model, arch_, tok, *bare, [3], "hidden")[3])
        with torch.no_grad():  # the editor writes this layer before the next read
            weight = get_module(model, arch_.mlp_out_name(layer)).weight
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    with pytest.raises(ValueError, match="cannot resume from the lower block"):
        keys_pass.read("key", 3, resume_from=1)
