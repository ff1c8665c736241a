"""The sequential driver end to end on a tiny model: checkpoints, trace, kill -9 and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.errors import ConfigError
from harness.testing import tiny_model

TINY = dict(layers=[1, 2], v_num_grad_steps=4, stats_samples=30, stats_max_tokens=48,
            context_templates=[[6, 2]], v_lr=0.5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_config(path: Path, model_dir, out_dir, cache_dir, **extra) -> Path:
    cfg = dict(model=str(model_dir), model_name="tiny-llama", methods=["memit", "lyaplock"],
               edit_data="counterfact", num_edits=24, edit_batch_size=2, eval_every=8,
               tasks=["counterfact_edit_scores"], output_dir=str(out_dir), seed=3,
               cache_dir=str(cache_dir), device="cpu",
               hparams={"memit": "smollm2-135m", "lyaplock": "smollm2-135m"},
               overrides={"memit": TINY, "lyaplock": TINY})
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--no_progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def results_of(run_dir: Path) -> dict:
    out = {}
    for f in sorted(run_dir.glob("*/checkpoints/*/results.json")):
        data = json.loads(f.read_text())
        out[str(f.relative_to(run_dir))] = (data["results"], data["seqedit"]["edited_case_ids"])
    return out


def traces_of(run_dir: Path) -> dict:
    keep = ("method", "batch", "edits_done", "layers", "target_loss")
    out = {}
    for f in sorted(run_dir.glob("*/trace.jsonl")):
        out[f.parent.name] = [{k: json.loads(line)[k] for k in keep} for line in f.read_text().splitlines()]
    return out


def test_kill_and_resume_equals_uninterrupted(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    straight = write_config(tmp_path / "a.yaml", tiny_dir, tmp_path / "straight", cache)
    proc = run_cli(["--config", str(straight)])
    log_a = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log_a[-3000:]

    cfg = write_config(tmp_path / "b.yaml", tiny_dir, tmp_path / "killed", cache)
    proc = run_cli(["--config", str(cfg)])
    trace = tmp_path / "killed" / "lyaplock" / "trace.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 in the middle of the second method's stream
        if trace.exists() and len(trace.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = results_of(tmp_path / "killed")
    assert any(k.startswith("memit/") for k in partial) and not any("edits_000024" in k for k in partial if k.startswith("lyaplock"))

    proc = run_cli(["--config", str(cfg), "--resume"])
    log_b = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log_b[-3000:]

    a, b = results_of(tmp_path / "straight"), results_of(tmp_path / "killed")
    assert set(a) == set(b) and len(a) == 2 * 4  # 0, 8, 16, 24 edits for two methods
    assert a == b
    assert traces_of(tmp_path / "straight") == traces_of(tmp_path / "killed")

    # the run directory as committed (no state/) and resumed elsewhere: the complete method is
    # skipped, the one whose last checkpoint is missing is re-edited from scratch, same numbers
    import shutil

    for state in (tmp_path / "killed").glob("*/state"):
        shutil.rmtree(state)
    (tmp_path / "killed" / "lyaplock/checkpoints/edits_000024/results.json").unlink()
    proc = run_cli(["--config", str(cfg), "--resume"])
    log_c = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log_c[-3000:]
    assert "[memit] complete" in log_c and "[lyaplock] complete" not in log_c
    assert results_of(tmp_path / "killed") == a
    assert traces_of(tmp_path / "killed") == traces_of(tmp_path / "straight")
    pre = json.loads((tmp_path / "straight" / "memit/checkpoints/edits_000000/results.json").read_text())
    assert pre["n-samples"]["counterfact_edit_scores"]["effective"] == 24  # the run's records only
    pre_lyap = json.loads((tmp_path / "straight" / "lyaplock/checkpoints/edits_000000/results.json").read_text())
    assert pre_lyap["results"] == pre["results"]  # the same untouched model, scored once
    assert pre_lyap["seqedit"]["method"] == "lyaplock" and pre_lyap["seqedit"]["pre_edited_from"] == "memit"
    final = json.loads((tmp_path / "straight" / "lyaplock/checkpoints/edits_000024/results.json").read_text())
    assert final["seqedit"]["edited_case_ids"] == list(range(24))
    assert "efficacy,none" in final["results"]["counterfact_edit_scores"]
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert {"config", "versions", "git_commit", "hardware", "seed"} <= set(manifest)
    lines = (tmp_path / "straight" / "lyaplock" / "trace.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["edits_done"] == 24 and {"preservation_loss", "threshold", "queue", "update_norm"} <= set(rec["layers"]["1"])
    assert rec["rss_mb"] > 50  # the process holds at least torch and the tiny model
    assert rec["peak_rss_mb"] >= rec["rss_mb"]
    assert set(rec["phase_seconds"]) == {"targets", "keys", "solve", "write"}
    # the profile's inputs: one-off costs per (re)start, each evaluation task's seconds
    setup = [json.loads(line) for line in (tmp_path / "killed" / "lyaplock" / "setup.jsonl").read_text().splitlines()]
    assert sum("model_load_seconds" in s for s in setup) == 3  # killed, resumed, resumed again
    assert all(s.get("model_load_seconds", 1) > 0 and s.get("prepare_seconds", 1) > 0 for s in setup)
    assert any("prepare_seconds" in s for s in setup)
    assert set(final["seqedit"]["evaluation_seconds"]) == {"counterfact_edit_scores"}
    assert final["seqedit"]["evaluation_seconds"]["counterfact_edit_scores"] > 0
    import runpy

    profile = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "profile_run.py"))["profile"]
    table = "\n".join(profile(tmp_path / "straight" / "lyaplock"))
    for phase in ("model load", "prepare", "editing: targets", "editing: write",
                  "evaluation at 24 edits: counterfact_edit_scores"):
        assert phase in table


def test_one_run_split_over_two_processes_equals_one_process(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    small = dict(num_edits=8, eval_every=4)
    straight = write_config(tmp_path / "a.yaml", tiny_dir, tmp_path / "straight", cache, **small)
    proc = run_cli(["--config", str(straight)])
    log_a = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log_a[-3000:]

    cfg = write_config(tmp_path / "b.yaml", tiny_dir, tmp_path / "split", cache, **small)
    procs = [run_cli(["--config", str(cfg), "--resume", "--only", m]) for m in ("lyaplock", "memit")]
    for p in procs:
        log = p.communicate(timeout=900)[0]
        assert p.returncode == 0, log[-3000:]
    a, b = results_of(tmp_path / "straight"), results_of(tmp_path / "split")
    assert len(a) == 2 * 3 and a == b
    assert traces_of(tmp_path / "straight") == traces_of(tmp_path / "split")


def test_only_selects_from_the_config_and_one_process_per_method(tiny_dir, tmp_path):
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun
    from harness.runs.storage import method_lock

    cfg = RunConfig(model=str(tiny_dir), methods=["memit", "lyaplock"], num_edits=0, eval_every=2,
                    edit_batch_size=2, tasks=["counterfact_edit_scores"], output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--only rome: not among this run's methods"):
        SequentialRun(cfg, only=["rome"])
    assert SequentialRun(cfg, only=["lyaplock"]).methods == ["lyaplock"]
    assert SequentialRun(cfg).methods == ["memit", "lyaplock"]
    with method_lock(tmp_path / "run" / "memit"):  # another process working on memit
        with pytest.raises(ConfigError, match=f"memit is being run by another process \\(pid {os.getpid()}, "):
            SequentialRun(cfg, only=["memit"], progress=False).run()
    assert not (tmp_path / "run" / "memit" / "checkpoints").exists()
    with method_lock(tmp_path / "run" / "memit"):  # released when the holder is done
        pass


def test_a_sibling_run_that_differs_only_after_the_first_edit_lends_its_pre_edited_checkpoint(tiny_dir, tmp_path):
    """The cells of a sweep over methods or hyper-parameters score the same untouched model on the
    same records with the same seeds: the pre-edited checkpoint is evaluated once. A sibling whose
    pre-edited scores would differ (another seed) evaluates its own."""
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    base = dict(model=str(tiny_dir), model_name="tiny-llama", methods=["memit"], num_edits=2, edit_batch_size=2,
                eval_every=2, tasks=["counterfact_edit_scores"], seed=3, cache_dir=str(tmp_path / "cache"),
                device="cpu", hparams={"memit": "smollm2-135m"}, overrides={"memit": TINY})
    cells = {"memit": base,
             "lyaplock": {**base, "methods": ["lyaplock"], "hparams": {"lyaplock": "smollm2-135m"},
                          "overrides": {"lyaplock": {**TINY, "v_lr": 1.0}}, "eval_at": [2]},
             "reseeded": {**base, "seed": 4}}
    for name, fields in cells.items():
        SequentialRun(RunConfig(**fields, output_dir=str(tmp_path / "sweep" / name)), progress=False).run()

    def pre_edited(name, method):
        path = tmp_path / "sweep" / name / method / "checkpoints/edits_000000/results.json"
        return json.loads(path.read_text())

    lent = pre_edited("lyaplock", "lyaplock")
    assert lent["seqedit"]["pre_edited_from"] == "memit/memit" and lent["seqedit"]["method"] == "lyaplock"
    assert lent["results"] == pre_edited("memit", "memit")["results"]
    assert "pre_edited_from" not in pre_edited("reseeded", "memit")["seqedit"]


def test_refuses_to_mix_configs(tiny_dir, tmp_path):
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    cfg = RunConfig(model=str(tiny_dir), methods=["memit"], num_edits=0, eval_every=2, edit_batch_size=2,
                    tasks=["counterfact_edit_scores"], output_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    SequentialRun(cfg)._check_or_write_manifest()
    other = RunConfig(**{**cfg.to_dict(), "num_edits": 4})
    with pytest.raises(ConfigError, match="different config.*num_edits"):
        SequentialRun(other, resume=True)._check_or_write_manifest()
    with pytest.raises(ConfigError, match="--resume"):
        SequentialRun(cfg)._check_or_write_manifest()
    # a run begun before eval_sample / fluency_sample / eval_at existed scored every record at
    # every checkpoint: it resumes only with those settings, and the error says so
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for key in ("eval_sample", "fluency_sample", "eval_at"):
        del manifest["config"][key]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="differs in: eval_sample, fluency_sample; the run has eval_sample: null"):
        SequentialRun(cfg, resume=True)._check_or_write_manifest()
    legacy = RunConfig(**{**cfg.to_dict(), "eval_sample": None, "fluency_sample": None})
    SequentialRun(legacy, resume=True)._check_or_write_manifest()


def test_a_run_resumes_once_given_the_permission_it_lacked_and_records_it(tiny_dir, tmp_path):
    """confirm_run_unsafe_code changes no result: a run started without it (whose code task then
    failed) resumes with it, and its manifest says that it holds the permission from then on."""
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    cfg = RunConfig(model=str(tiny_dir), methods=["memit"], num_edits=0, eval_every=2, edit_batch_size=2,
                    tasks=["counterfact_edit_scores"], output_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    SequentialRun(cfg)._check_or_write_manifest()
    manifest = tmp_path / "run" / "manifest.json"
    assert json.loads(manifest.read_text())["config"]["confirm_run_unsafe_code"] is False
    allowed = RunConfig(**{**cfg.to_dict(), "confirm_run_unsafe_code": True})
    SequentialRun(allowed, resume=True)._check_or_write_manifest()
    recorded = json.loads(manifest.read_text())
    assert recorded["config"]["confirm_run_unsafe_code"] is True
    assert {k: v for k, v in recorded["config"].items() if k != "confirm_run_unsafe_code"} == {
        k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "confirm_run_unsafe_code"}
    # the other way round it is the same run too (validation refuses a code task without it)
    SequentialRun(cfg, resume=True)._check_or_write_manifest()
    assert json.loads(manifest.read_text())["config"]["confirm_run_unsafe_code"] is False


def test_a_resume_under_changed_hyper_parameter_values_is_refused(tiny_dir, tmp_path):
    """The manifest names the hparams file; its values are recorded per method too, so that a file
    edited between two processes (a retuned lambda) cannot continue the old edit state under new
    values. A description is free text; a method directory from before the record adopts the
    current values once, and says so."""
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun, run_is_complete

    hp_file = tmp_path / "memit-tuned.yaml"
    hp_file.write_text("inherit: memit/smollm2-135m\nmom2_update_weight: 15000\ndescription: first\n")
    cfg = RunConfig(model=str(tiny_dir), methods=["memit"], num_edits=2, eval_every=2, edit_batch_size=2,
                    tasks=["counterfact_edit_scores"], seed=3, cache_dir=str(tmp_path / "cache"), device="cpu",
                    hparams={"memit": str(hp_file)}, overrides={"memit": TINY}, output_dir=str(tmp_path / "run"))
    SequentialRun(cfg, progress=False).run()
    record = tmp_path / "run" / "memit" / "hparams.json"
    recorded = json.loads(record.read_text())["hparams"]
    assert recorded["mom2_update_weight"] == 15000 and recorded["layers"] == [1, 2]

    hp_file.write_text("inherit: memit/smollm2-135m\nmom2_update_weight: 20000\ndescription: retuned\n")
    with pytest.raises(ConfigError, match=r"other memit hyper-parameters .*mom2_update_weight: 15000.0 -> 20000.0"):
        SequentialRun(cfg, resume=True, progress=False).run()
    assert not run_is_complete(cfg)  # a sweep runs the cell, which then says what is wrong
    # a key the code gained after the record was written: its default is what the run used
    del recorded["ft_loss"]
    record.write_text(json.dumps({"method": "memit", "hparams": recorded}))
    hp_file.write_text("inherit: memit/smollm2-135m\nmom2_update_weight: 15000\ndescription: retuned\n")
    assert run_is_complete(cfg)
    SequentialRun(cfg, resume=True, progress=False).run()  # complete, same values: nothing to redo

    record.unlink()  # a run from before the record
    messages = []
    legacy = SequentialRun(cfg, resume=True, progress=False)
    legacy.bar = type("Bar", (), {"write": staticmethod(messages.append)})()
    legacy._check_or_record_hparams("memit")
    assert "predates the record" in messages[0]
    assert json.loads(record.read_text())["hparams"]["mom2_update_weight"] == 15000
    # an export carries the record, so a committed run refuses the same mix where it is resumed
    from harness.runs.resultsdir import export_results

    export_results(tmp_path / "run", tmp_path / "exported")
    assert (tmp_path / "exported" / "memit" / "hparams.json").read_text() == record.read_text()


def test_config_validation():
    from harness.runs.config import RunConfig

    with pytest.raises(ValueError, match="multiple of edit_batch_size"):
        RunConfig(eval_every=15, edit_batch_size=10).validate()
    with pytest.raises(ValueError, match="unknown method"):
        RunConfig(methods=["nope"]).validate()
    assert RunConfig(num_edits=25, eval_every=10, edit_batch_size=5).checkpoints() == [0, 10, 20, 25]
    cfg = RunConfig(num_edits=500, eval_every=250, edit_batch_size=50, eval_at=[100, 300], eval_sample="all")
    cfg.validate()
    assert cfg.checkpoints() == [0, 100, 250, 300, 500] and cfg.eval_sample is None
    with pytest.raises(ConfigError, match="eval_at \\[150, 600\\]: each must be a multiple"):
        RunConfig(num_edits=500, eval_every=250, edit_batch_size=100, eval_at=[150, 600]).validate()
    with pytest.raises(ConfigError, match="eval_sample \\(100\\) must exceed edit_batch_size"):
        RunConfig(num_edits=500, eval_every=100, edit_batch_size=100, eval_sample=100).validate()


def test_every_editor_runs_through_the_driver_into_the_leaderboard(tiny_dir, tmp_path):
    """Each editor and LyapLock add-on, by the names a run config uses, edits through the driver
    and gets its own row in the leaderboard."""
    from harness.editors import EDITORS
    from harness.editors.lyaplock import BASES
    from harness.runs import leaderboard
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    methods = [*EDITORS, *(f"lyaplock-{b}" for b in BASES if b != "memit")]
    one_layer = {**TINY, "layers": [1]}
    cfg = RunConfig(
        model=str(tiny_dir), model_name="tiny-llama", methods=methods, num_edits=2, edit_batch_size=2,
        eval_every=2, tasks=["counterfact_edit_scores"], output_dir=str(tmp_path / "run"), seed=0,
        cache_dir=str(tmp_path / "cache"), device="cpu",
        hparams={m: "smollm2-135m" for m in methods},
        overrides={m: one_layer if m in ("ft", "rome") else TINY for m in methods})
    SequentialRun(cfg, progress=False).run()
    for m in methods:
        trace = (tmp_path / "run" / m / "trace.jsonl").read_text().splitlines()
        assert len(trace) == 1 and json.loads(trace[0])["method"] == m
        final = json.loads((tmp_path / "run" / m / "checkpoints/edits_000002/results.json").read_text())
        assert final["seqedit"]["edited_case_ids"] == [0, 1]

    out = tmp_path / "boards"
    assert leaderboard.main([str(tmp_path / "run"), "--out", str(out)]) == 0
    import csv

    with open(out / "leaderboard_editing.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["Method"] for r in rows) == sorted(["Pre-edited", *methods])
    assert all(r["CounterFact Eff."] != "" for r in rows)


def test_work_from_an_earlier_process_does_not_count_towards_the_rate():
    import io

    from tqdm import tqdm

    from harness.runs.driver import count_as_done_before

    out = io.StringIO()
    bar = tqdm(total=1000, file=out, mininterval=0, miniters=1, smoothing=0)
    count_as_done_before(bar, 600)
    time.sleep(0.2)
    bar.update(10)
    stats = bar.format_dict
    assert stats["n"] == 610 and stats["initial"] == 600
    # the rate is the 10 edits made here over the time they took, not 610 over it
    rate = (stats["n"] - stats["initial"]) / stats["elapsed"]
    assert rate < 100
    assert "610/1000" in out.getvalue()
    bar.close()


def test_the_bar_s_rate_and_eta_leave_out_model_loading_and_evaluation(tiny_dir, tmp_path, monkeypatch):
    """The bar counts edits: were the hours a late checkpoint takes on its clock, the next batch
    would read as a thousandfold slowdown (a 10,000-edit run showed an ETA of 183 h after a resume
    where the forecast said 8.6). Here loading and every evaluation take 10,000 s of the bar's
    clock; none of it may reach the bar's elapsed time or rate."""
    import tqdm.std

    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun

    offset = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: time.time() + offset[0])

    def slowed(step):
        def step_then_advance_the_clock(self, *args):
            out = step(self, *args)
            offset[0] += 10_000
            return out
        return step_then_advance_the_clock

    monkeypatch.setattr(SequentialRun, "load_model", slowed(SequentialRun.load_model))
    monkeypatch.setattr(SequentialRun, "evaluate", slowed(SequentialRun.evaluate))
    at_close = []  # a closed bar no longer reports its rate

    def close_recording_its_stats(bar, close=tqdm.std.tqdm.close):
        at_close.append((getattr(bar, "desc", None), bar.format_dict))
        close(bar)

    monkeypatch.setattr(tqdm.std.tqdm, "close", close_recording_its_stats)
    cfg = RunConfig(model=str(tiny_dir), model_name="tiny-llama", methods=["memit"], num_edits=4,
                    edit_batch_size=2, eval_every=2, tasks=["counterfact_edit_scores"],
                    output_dir=str(tmp_path / "run"), seed=5, cache_dir=str(tmp_path / "cache"),
                    device="cpu", hparams={"memit": "smollm2-135m"}, overrides={"memit": TINY})
    SequentialRun(cfg).run()
    assert offset[0] == 40_000  # one load, checkpoints at 0, 2 and 4 edits
    stats = next(stats for desc, stats in at_close if desc == "sequential run")
    assert stats["n"] == 4
    assert stats["elapsed"] < 1_000
    assert stats["rate"] is not None and stats["rate"] > 4 / 1_000


def test_the_forecast_scales_a_sampled_task_s_seconds_to_the_last_checkpoint_s_records():
    """The last checkpoint scores every edited record: its forecast multiplies each sampled task's
    seconds by the records it will score over the records the sample scored; tasks that are not
    sampled (edit_glue, perplexity) cost what they cost."""
    from harness.runs.evaluation import checkpoint_seconds

    results = {"seqedit": {
        "evaluation_seconds": {"counterfact_edit_scores": 50.0, "counterfact_edit_generation": 100.0,
                               "edit_glue": 200.0, "wikitext_edit": 30.0},
        "evaluation_sample": {"counterfact_edit_scores": {"case_ids": list(range(500))},
                              "counterfact_edit_generation": {"case_ids": list(range(100))}}}}
    took, every = checkpoint_seconds(results, 10_000)
    assert took == 380.0
    assert every == 50.0 * 20 + 100.0 * 100 + 200.0 + 30.0
    # a checkpoint that already scored every record predicts itself
    assert checkpoint_seconds(results, 100)[1] == 50.0 / 5 + 100.0 + 230.0
    # results without a sample (lm-eval's own tasks only) cost the same at any length
    assert checkpoint_seconds({"seqedit": {"evaluation_seconds": {"edit_glue": 7.0}}}, 10_000) == (7.0, 7.0)


def test_checkpoint_costs_take_the_median_so_one_slowed_checkpoint_does_not_inflate_them(tmp_path):
    """A Gemma checkpoint that shared the cores with a test run took 1,201 s against 579-656 s for
    the others; the forecast and ``seqedit status`` estimate from the median of those measured
    after editing began (the pre-edited one only while there is none)."""
    from harness.runs.driver import checkpoint_costs, checkpoint_results_path

    def write(point, seconds):
        path = checkpoint_results_path(tmp_path, point)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"seqedit": {"evaluation_seconds": {"edit_glue": seconds}}}))

    points = [0, 500, 1000, 1500, 2000]
    assert checkpoint_costs(tmp_path, points, 2000) is None
    write(0, 605.0)
    assert checkpoint_costs(tmp_path, points, 2000) == (605.0, 605.0)
    for point, seconds in ((500, 1201.0), (1000, 656.0), (1500, 579.0)):
        write(point, seconds)
    assert checkpoint_costs(tmp_path, points, 2000) == (656.0, 656.0)


def test_the_forecast_leaves_out_the_pre_edited_checkpoints_the_later_methods_copy(tmp_path):
    """Every method after the first copies the pre-edited checkpoint instead of scoring it again,
    so the forecast after the first batch counts only their checkpoints after an edit."""
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun, checkpoint_results_path

    cfg = RunConfig(model_name="tiny-llama", methods=["memit", "alphaedit", "lyaplock"], num_edits=1000,
                    edit_batch_size=100, eval_every=500, tasks=["edit_glue"], eval_sample=None,
                    output_dir=str(tmp_path / "run"))
    run = SequentialRun(cfg, progress=False)
    pre_edited = checkpoint_results_path(tmp_path / "run" / "memit", 0)
    pre_edited.parent.mkdir(parents=True)
    pre_edited.write_text(json.dumps({"seqedit": {"evaluation_seconds": {"edit_glue": 600.0}}}))
    text = run._forecast("memit", {"edit_seconds": 100.0, "batch_size": 100, "edits_done": 100})
    # memit: 500 and 1,000 edits; alphaedit and lyaplock: the same two each, not 0 edits again
    assert "2,900 edits left at 1.00 s/edit = 0.8 h of editing" in text
    assert "3 earlier checkpoints at about 10 min and the last of each method" in text
    assert "= 1.0 h of evaluation" in text


def test_checkpoints_score_a_stratified_sample_and_the_last_one_every_record(tiny_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """eval_sample / fluency_sample bound what a checkpoint scores: the first batch always, a
    seeded share of every tenth of the edits, stratified estimates with their standard errors,
    the retention rows, and every record at the last checkpoint, in chunks that a killed
    evaluation resumes from."""
    import harness.runs.evaluation
    from harness.runs.config import RunConfig
    from harness.runs.driver import SequentialRun
    from harness.runs.sampling import plan_sample, stratified_mean

    monkeypatch.setattr(harness.runs.evaluation, "EVAL_CHUNK", 3)

    cfg = RunConfig(model=str(tiny_dir), model_name="tiny-llama", methods=["memit"], num_edits=12,
                    edit_batch_size=2, eval_every=6, tasks=["counterfact_edit"], eval_sample=4,
                    fluency_sample=2, log_samples=True, output_dir=str(tmp_path / "run"), seed=5,
                    cache_dir=str(tmp_path / "cache"), device="cpu", hparams={"memit": "smollm2-135m"},
                    overrides={"memit": TINY})
    SequentialRun(cfg, progress=False).run()
    # after its first batch the run says how long the rest will take, checkpoints included
    out = capsys.readouterr().out
    assert re.search(r"\[memit\] forecast: 10 edits left at [0-9.]+ s/edit = [0-9.]+ h of editing; "
                     r"1 earlier checkpoint at about \d+ min and the last \(every one of 12 edited records\) about \d+ min = "
                     r"[0-9.]+ h of evaluation", out)
    # without a bar (a sweep cell's log file) every batch writes a line with the editing left
    batches = re.findall(r"\[memit\] (\d+)/12 edits; batch \d+ s; editing left about [0-9.]+ h, checkpoints not counted",
                         out)
    assert batches == [str(n) for n in range(2, 13, 2)]

    def checkpoint(point):
        d = tmp_path / "run" / "memit" / "checkpoints" / f"edits_{point:06d}"
        return json.loads((d / "results.json").read_text()), json.loads((d / "samples.json").read_text())

    stream = list(range(12))  # the bundled sample's case ids are 0, 1, ...
    for point, n_scores, n_fluency in ((0, 4, 2), (6, 4, 2), (12, 12, 12)):
        results, samples = checkpoint(point)
        sample = results["seqedit"]["evaluation_sample"]
        scored = sample["counterfact_edit_scores"]
        records = 12 if point == 0 else point  # before any edit: the records the run will edit
        plan = plan_sample(records, None if point == 12 else 4, 2, 5)
        assert scored["case_ids"] == [stream[p] for p in plan.positions] and len(plan.positions) == n_scores
        assert scored["complete"] == (point == 12) and {0, 1} <= set(scored["case_ids"])
        fluency = sample["counterfact_edit_generation"]
        assert fluency["scored"] == n_fluency and fluency["field"] == "fluency_sample"
        assert [d["doc"]["case_id"] for d in samples["counterfact_edit_generation"]] == fluency["case_ids"]
        assert results["n-samples"]["counterfact_edit_scores"]["effective"] == n_scores
        # lm-eval's own count says the same, chunked or not
        assert results["results"]["counterfact_edit_scores"]["sample_len"] == n_scores
        assert results["results"]["counterfact_edit_generation"]["sample_len"] == n_fluency
        # the reported efficacy is the stratified estimate from the per-record values
        values = {d["doc"]["case_id"]: d["efficacy"] for d in samples["counterfact_edit_scores"]}
        mean, stderr = stratified_mean(values, plan)
        table = results["results"]["counterfact_edit_scores"]
        assert table["efficacy,none"] == pytest.approx(mean) and table["efficacy_stderr,none"] == pytest.approx(stderr)
        if point == 0:  # nothing edited yet: no retention to speak of
            assert results["seqedit"]["retention"] == {}
            continue
        rows = results["seqedit"]["retention"]["counterfact_edit_scores"]
        assert rows["first_batch"]["scored"] == 2 and "generalization" in rows["first_batch"]
        assert rows["first_batch"]["edits_since"] == point - 2
    assert not (tmp_path / "run/memit/checkpoints/edits_000012/partial").exists()

    # killed in the middle of the last evaluation (12 records in chunks of 3: 4 lm-eval calls per
    # subtask), the resumed run keeps the chunks already scored and ends with the same results
    import harness.runs.evaluation as evaluation

    killed = RunConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "killed")})
    real_write, calls = evaluation.atomic_write_text, []

    def crash_on_third_chunk(path, text):
        if path.parent.name == "partial" and "edits_000012" in str(path):
            calls.append(path.name)
            if len(calls) == 3:
                raise KeyboardInterrupt("killed")
        real_write(path, text)

    monkeypatch.setattr(evaluation, "atomic_write_text", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        SequentialRun(killed, progress=False).run()
    monkeypatch.setattr(evaluation, "atomic_write_text", real_write)
    partial = tmp_path / "killed/memit/checkpoints/edits_000012/partial"
    assert sorted(p.name for p in partial.iterdir()) == ["counterfact_edit_scores.0000.json",
                                                         "counterfact_edit_scores.0001.json"]
    import lm_eval

    real_evaluate, evaluated = lm_eval.simple_evaluate, []

    def counting(*args, **kwargs):
        evaluated.append(kwargs["tasks"][0])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    SequentialRun(killed, resume=True, progress=False).run()
    assert evaluated == ["counterfact_edit_scores"] * 2 + ["counterfact_edit_generation"] * 4
    for point in (0, 6, 12):
        a, b = (json.loads((tmp_path / d / f"memit/checkpoints/edits_{point:06d}/results.json").read_text())
                for d in ("run", "killed"))
        assert a["results"] == b["results"] and a["seqedit"]["retention"] == b["seqedit"]["retention"]
