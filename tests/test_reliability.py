"""Reliability: what a long run must survive. Numerical faults are never written: an update with
NaN or Inf stops the batch with an error naming method, batch and layer, the weights stay as they
were before the batch, and a sequential run keeps its last good state, resumable."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from harness.data import load_counterfact
from harness.editors import editor_class
from harness.editors.guard import NonFiniteUpdateError, checked_weight
from harness.editors.hparams import load_hparams
from harness.editors.memit import MEMITEditor
from harness.testing import tiny_model

FAST = dict(layers=[1, 2], v_num_grad_steps=4, stats_samples=30, stats_max_tokens=48,
            context_templates=[[6, 2]], v_lr=0.5)


@pytest.fixture(scope="session")
def requests():
    return load_counterfact(limit=12)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def make_editor(method, cache_dir, **over):
    model, tok = tiny_model("llama")
    hp = load_hparams(method, "smollm2-135m", overrides={**FAST, **over})
    return editor_class(method)(model, tok, hp, cache_dir=cache_dir, progress=False)


def snapshot(ed):
    return {name: p.detach().clone() for name, p in ed.model.named_parameters()}


def assert_unchanged(ed, before):
    for name, p in ed.model.named_parameters():
        assert torch.equal(p, before[name]), name


METHODS = [
    ("memit", {}), ("alphaedit", {}), ("lyaplock", {}), ("prune", {}), ("rect", {}),
    ("rlsedit", {}), ("encore", {}), ("lyaplock", {"base": "prune"}), ("lyaplock", {"base": "alphaedit"}),
    ("rome", {"layers": [2]}), ("ft", {"layers": [1], "ft_steps": 2}),
]


@pytest.mark.parametrize("method,over", METHODS, ids=[f"{m}-{o.get('base', '')}" for m, o in METHODS])
def test_an_infinite_learning_rate_is_refused_before_any_weight_is_written(method, over, requests, cache_dir):
    ed = make_editor(method, cache_dir, **over)
    ed.apply_batch(requests[:2])  # a good batch first: the failure is the second one
    before = snapshot(ed)
    bad = {"ft_lr": math.inf} if method == "ft" else {"v_lr": math.inf}
    ed.hp = type(ed.hp)(**{**ed.hp.to_dict(), **bad})
    with pytest.raises(NonFiniteUpdateError, match=rf"{ed.name}: batch 1 \(edits 2\+\).*NaN/Inf.*Nothing of this batch was written"):
        ed.apply_batch(requests[2:4])
    assert_unchanged(ed, before)
    assert ed.batches_done == 1 and ed.edits_done == 2


def test_first_batch_of_ft_with_an_infinite_rate_is_refused(requests, cache_dir):
    ed = make_editor("ft", cache_dir, layers=[1], ft_lr=math.inf, ft_steps=2)
    before = snapshot(ed)
    with pytest.raises(NonFiniteUpdateError, match=r"ft: batch 0 \(edits 0\+\), layer 1: the fine-tuning update"):
        ed.apply_batch(requests[:2])
    assert_unchanged(ed, before)


@pytest.mark.parametrize("method", ["memit", "prune", "rect"])
def test_a_non_finite_solve_in_a_later_layer_puts_the_earlier_layers_back(method, requests, cache_dir, monkeypatch):
    """Layer 1 is solved and written (layer 2's keys must see it) before layer 2's solve fails:
    layer 1 goes back, the editor's state is untouched, and the stream continues as if the
    failed batch had never been tried."""
    ed = make_editor(method, cache_dir, mom2_update_weight=1e-3)
    twin = make_editor(method, cache_dir, mom2_update_weight=1e-3)
    ed.apply_batch(requests[:2])
    twin.apply_batch(requests[:2])
    before = snapshot(ed)
    original = MEMITEditor.solve_layer

    def singular_at_layer_2(self, i, layer, W, K, R, reqs):
        delta = original(self, i, layer, W, K, R, reqs)
        return delta * float("nan") if layer == 2 else delta

    monkeypatch.setattr(MEMITEditor, "solve_layer", singular_at_layer_2)
    with pytest.raises(NonFiniteUpdateError, match=rf"{method}: batch 1 \(edits 2\+\), layer 2: the update has \d+ NaN/Inf"):
        ed.apply_batch(requests[2:4])
    assert_unchanged(ed, before)
    monkeypatch.setattr(MEMITEditor, "solve_layer", original)
    ed.apply_batch(requests[2:4])
    twin.apply_batch(requests[2:4])
    for name, p in ed.model.named_parameters():
        assert torch.equal(p, dict(twin.model.named_parameters())[name]), name
    if method == "prune":
        for layer in ed.layers:
            assert layer not in twin.restraint.raw or torch.equal(ed.restraint.raw[layer], twin.restraint.raw[layer])


def test_an_update_that_overflows_the_weight_dtype_is_refused(requests, cache_dir):
    ed = make_editor("memit", cache_dir)
    W = torch.ones(3, 4, dtype=torch.float16)
    assert torch.equal(checked_weight(ed, 1, W, torch.full((3, 4), 2.0)), torch.full((3, 4), 3.0, dtype=torch.float16))
    with pytest.raises(NonFiniteUpdateError, match=r"layer 1: W \+ update overflows torch.float16 in 12 entries"):
        checked_weight(ed, 1, W, torch.full((3, 4), 1e6))
    with pytest.raises(NonFiniteUpdateError, match=r"layer 1: the final update has 1 NaN/Inf"):
        checked_weight(ed, 1, W, torch.tensor([[float("inf")] + [0.0] * 3] + [[0.0] * 4] * 2), "final update")


def test_a_run_stops_at_the_bad_batch_and_resumes_from_the_last_good_one(tmp_path, monkeypatch, capsys):
    """In a sequential run the faulty batch ends the run with one error line and exit status 2;
    the trace, the checkpoints and the edit state are those of the last good batch, and
    --resume (once the fault is gone) continues to the end."""
    from harness.runs.driver import main

    d = tmp_path / "model"
    model, tok = tiny_model("llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = dict(model=str(d), model_name="tiny-llama", methods=["memit"], edit_data="counterfact",
               num_edits=8, edit_batch_size=2, eval_every=4, tasks=["counterfact_edit_scores"],
               output_dir=str(tmp_path / "run"), seed=3, cache_dir=str(tmp_path / "cache"),
               device="cpu", hparams={"memit": "smollm2-135m"}, overrides={"memit": FAST})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    original = MEMITEditor.solve_layer

    def fails_in_batch_3(self, i, layer, W, K, R, reqs):
        delta = original(self, i, layer, W, K, R, reqs)
        return delta * float("inf") if self.batches_done == 3 and layer == 2 else delta

    monkeypatch.setattr(MEMITEditor, "solve_layer", fails_in_batch_3)
    assert main(["--config", str(path), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "seqedit run: error: memit: batch 3 (edits 6+), layer 2: the update has" in err and "--resume" in err
    run = tmp_path / "run" / "memit"
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in trace] == [0, 1, 2]
    assert all(math.isfinite(e["preservation_loss"]) for r in trace for e in r["layers"].values())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["edits_000000", "edits_000004"]
    state = torch.load(run / "state" / "edit_state.pt", weights_only=False)
    assert state["lm"]["edited_case_ids"] == list(range(6))
    assert all(torch.isfinite(w).all() for w in state["lm"]["editor"]["weights"].values())

    monkeypatch.setattr(MEMITEditor, "solve_layer", original)
    assert main(["--config", str(path), "--no_progress", "--resume"]) == 0
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in trace] == [0, 1, 2, 3]
    final = json.loads((run / "checkpoints" / "edits_000008" / "results.json").read_text())
    assert final["seqedit"]["edited_case_ids"] == list(range(8))


# ------------------------------------------------------------------------- statistics cache


def test_statistics_cache_is_keyed_by_every_weight_below_the_layer(tmp_path):
    """One changed weight, which the old strided fingerprint never looked at, gives other
    statistics for the layers above it, and none for the layers below."""
    from harness.arch import architecture_for
    from harness.editors.stats import keys_fingerprints

    model, _ = tiny_model("llama")
    arch = architecture_for(model)
    before = keys_fingerprints(model, arch, [0, 1, 2])
    W = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        W.view(-1)[1] += 1e-3  # one entry (the old key sampled every numel // 512-th only)
    after = keys_fingerprints(model, arch, [0, 1, 2])
    assert after[0] == before[0] and after[1] != before[1] and after[2] != before[2]


@pytest.mark.parametrize("damage", ["truncated", "other_layer", "wrong_shape", "nan", "not_a_dict"])
def test_a_damaged_statistics_entry_is_recomputed_with_a_warning(damage, tmp_path, caplog):
    from harness.arch import architecture_for
    from harness.editors.stats import load_or_compute_second_moments

    model, tok = tiny_model("gpt2")
    arch = architecture_for(model)
    good = load_or_compute_second_moments(model, arch, tok, [1], "bundled", 12, 32, tmp_path, progress=False)[1]
    (path,) = list(tmp_path.rglob("*.pt"))
    payload = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "other_layer":
        torch.save({**payload, "layer": 2}, path)
    elif damage == "wrong_shape":
        torch.save({**payload, "mom2": payload["mom2"][:-1]}, path)
    elif damage == "nan":
        torch.save({**payload, "mom2": payload["mom2"] * float("nan")}, path)
    else:
        torch.save([1, 2, 3], path)
    with caplog.at_level("WARNING", logger="harness.editors.stats"):
        again = load_or_compute_second_moments(model, arch, tok, [1], "bundled", 12, 32, tmp_path, progress=False)[1]
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert torch.equal(again, good)
    assert torch.equal(torch.load(path, weights_only=True)["mom2"], good)  # the entry is whole again


def test_non_finite_statistics_are_an_error_not_a_cache_entry(tmp_path):
    from harness.arch import architecture_for
    from harness.editors.stats import load_or_compute_second_moments

    model, tok = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="key statistics of layer 1 are not finite"):
        load_or_compute_second_moments(model, architecture_for(model), tok, [1], "bundled", 12, 32, tmp_path,
                                       progress=False)
    assert not list(tmp_path.rglob("*.pt"))


# ------------------------------------------------------------------------------ run state

def _results(run_dir):
    out = {}
    for f in sorted(run_dir.glob("*/checkpoints/*/results.json")):
        data = json.loads(f.read_text())
        out[str(f.relative_to(run_dir))] = (data["results"], data["seqedit"]["edited_case_ids"])
    return out


def _batches(trace_path):
    return [json.loads(line)["batch"] for line in trace_path.read_text().splitlines()]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One complete 8-edit MEMIT run (checkpoints 0, 4, 8) that each test copies and damages."""
    from harness.runs.driver import main

    root = tmp_path_factory.mktemp("state")
    model, tok = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    cfg = dict(model=str(root / "model"), model_name="tiny-llama", methods=["memit"], edit_data="counterfact",
               num_edits=8, edit_batch_size=2, eval_every=4, tasks=["counterfact_edit_scores"],
               output_dir=str(root / "run"), seed=3, cache_dir=str(root / "cache"), device="cpu",
               hparams={"memit": "smollm2-135m"}, overrides={"memit": FAST})
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(root / "run.yaml"), "--no_progress"]) == 0
    return root


def _copy_and_resume(finished_run, tmp_path, damage, capsys, where="run"):
    import shutil

    from harness.runs.driver import main

    run = tmp_path / where
    shutil.copytree(finished_run / "run", run)
    damage(run / "memit")
    cfg = yaml.safe_load((finished_run / "run.yaml").read_text())
    cfg["output_dir"] = str(run)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["--config", str(tmp_path / "run.yaml"), "--no_progress", "--resume"])
    return rc, run, capsys.readouterr()


def _truncate(path):
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


DAMAGES = {
    "truncated": (lambda m: _truncate(m / "checkpoints/edits_000004/results.json"), "results.json is damaged"),
    "deleted": (lambda m: (m / "checkpoints/edits_000004/results.json").unlink(), "checkpoint at 4 edits must be recomputed"),
    "foreign": (lambda m: (m / "checkpoints/edits_000004/results.json").write_text(
        (m / "checkpoints/edits_000008/results.json").read_text()), "belongs to 'memit' at 8 edits"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_or_missing_checkpoint_in_the_middle_is_recomputed(kind, finished_run, tmp_path, capsys):
    """Before: a truncated results.json counted as complete and a deleted one in the middle was
    never recomputed. Now resume reports it and edits again from the start to recompute it (the
    edit state is past it); the results equal the undamaged run's."""
    damage, message = DAMAGES[kind]
    rc, run, out = _copy_and_resume(finished_run, tmp_path, damage, capsys)
    assert rc == 0
    assert message in out.out + out.err
    assert "editing again from the start" in out.out + out.err
    assert _results(run) == _results(finished_run / "run")
    assert _batches(run / "memit" / "trace.jsonl") == [0, 1, 2, 3]


def test_a_damaged_edit_state_falls_back_to_the_previous_save(finished_run, tmp_path, capsys):
    def damage(m):
        state = m / "state" / "edit_state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: torch may well still load it
        state.write_bytes(bytes(data))
        (m / "checkpoints/edits_000008/results.json").unlink()

    rc, run, out = _copy_and_resume(finished_run, tmp_path, damage, capsys)
    assert rc == 0
    text = out.out + out.err
    assert "edit_state.pt does not match its checksum" in text
    assert "resuming from edit_state.pt.prev (6 edits)" in text
    assert _results(run) == _results(finished_run / "run")
    assert _batches(run / "memit" / "trace.jsonl") == [0, 1, 2, 3]


def test_half_written_files_of_a_killed_process_are_removed(finished_run, tmp_path, capsys):
    def damage(m):
        (m / "state" / "edit_state.pt.tmp999999").write_bytes(b"half")
        (m / "checkpoints/edits_000004/results.json.tmp999999").write_text("{")
        (m / "trace.jsonl.tmp4194303").write_text("")

    rc, run, out = _copy_and_resume(finished_run, tmp_path, damage, capsys)
    assert rc == 0 and "removed 3 half-written file(s)" in out.out + out.err
    assert not list(run.rglob("*.tmp[0-9]*"))


def test_a_moved_run_directory_resumes_and_restores_missing_trace_lines(finished_run, tmp_path, capsys):
    """Before: the manifest's output_dir differed, so a moved or copied run was refused."""
    def damage(m):
        (m / "checkpoints/edits_000008/results.json").unlink()
        lines = (m / "trace.jsonl").read_text().splitlines()
        (m / "trace.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")

    rc, run, out = _copy_and_resume(finished_run, tmp_path, damage, capsys, where="elsewhere/moved")
    assert rc == 0, out.err
    assert "trace.jsonl lacked 2 of 4 batches: restored from the saved state" in out.out + out.err
    assert _results(run) == _results(finished_run / "run")
    assert _batches(run / "memit" / "trace.jsonl") == [0, 1, 2, 3]


def test_two_processes_computing_one_statistics_entry_leave_a_valid_entry(tmp_path, monkeypatch):
    """Both write their own temporary file and replace the entry atomically: whichever lands last,
    the entry is whole, and a third process uses it without recomputing."""
    import subprocess
    import sys

    from harness.arch import architecture_for
    from harness.editors import stats

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from harness.arch import architecture_for\n"
        "from harness.editors.stats import load_or_compute_second_moments\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, torch_dtype=torch.float32)\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'model')!r})\n"
        f"out = load_or_compute_second_moments(m, architecture_for(m), t, [1, 2], 'bundled', 40, 48, {str(tmp_path / 'cache')!r}, progress=False)\n"
        "print(float(out[1].sum()), float(out[2].sum()))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    assert outputs[0][0] == outputs[1][0]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2 and not list((tmp_path / "cache").rglob("*.tmp*"))

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    monkeypatch.setattr(stats, "accumulate_second_moments",
                        lambda *a, **k: pytest.fail("a valid cache entry was recomputed"))
    out = stats.load_or_compute_second_moments(reloaded, architecture_for(reloaded), tok, [1, 2], "bundled", 40, 48,
                                               tmp_path / "cache", progress=False)
    assert outputs[0][0].split() == [repr(float(out[1].sum())), repr(float(out[2].sum()))]
