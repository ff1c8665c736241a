"""seqedit sweep: grid expansion and the local executor on a tiny model."""

import json
import os
import signal
import threading
import time

import pytest
import yaml
from test_driver import TINY

from harness.errors import ConfigError
from harness.runs.sweep import expand, read_sweep


def _sweep_file(tmp_path, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep_dir": str(tmp_path / "sweep"), **fields}))
    return path


def test_scalar_lists_lists_of_lists_and_dotted_grid_paths_are_axes(tmp_path):
    path = _sweep_file(tmp_path, methods=[["memit"], ["lyaplock"]], tasks=["counterfact_edit_scores"],
                       seed=[0, 1], num_edits=4, edit_batch_size=2, eval_every=2,
                       grid={"overrides.*.v_lr": [0.5, 1.0]})
    sweep_dir, base, axes = read_sweep(path)
    assert [a for a, _ in axes] == ["methods", "seed", "overrides.*.v_lr"]
    assert base["tasks"] == ["counterfact_edit_scores"]  # a plain list field is not an axis
    cells = expand(sweep_dir, base, axes)
    assert len(cells) == 8 and len({c.config["output_dir"] for c in cells}) == 8
    first = cells[0]
    assert first.name == "methods-memit_seed-0_v_lr-0.5"
    assert first.config["output_dir"] == str(tmp_path / "sweep" / first.name)
    assert first.config["methods"] == ["memit"] and first.config["overrides"] == {"*": {"v_lr": 0.5}}


def test_every_cell_is_validated_before_anything_runs(tmp_path):
    path = _sweep_file(tmp_path, seed=[0, 1], edit_batch_size=[2, 3], eval_every=4, num_edits=4)
    with pytest.raises(ConfigError, match="cell edit_batch_size-3_seed-0: eval_every \\(4\\) must be a multiple"):
        expand(*read_sweep(path))
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ConfigError, match="sweep_dir"):
        read_sweep(_sweep_file(tmp_path, seed=0, output_dir="x"))


# a 2 x 2 grid on a tiny model: two seeds, two learning rates of the target values
GRID = dict(seed=[0, 1], grid={"overrides.*.v_lr": [0.5, 1.0]})
CELLS = [f"seed-{s}_v_lr-{lr}" for s in (0, 1) for lr in (0.5, 1.0)]
POINTS = (0, 2, 4)
VICTIM = CELLS[-1]


def _sweep_fields(root):
    from harness.testing import tiny_model

    model_dir = root / "tiny-llama"
    model, tok = tiny_model("llama")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return dict(model=str(model_dir), model_name="tiny-llama", methods=["memit"], edit_data="counterfact",
                num_edits=4, edit_batch_size=2, eval_every=2, tasks=["counterfact_edit_scores"], device="cpu",
                cache_dir=str(root / "cache"), hparams={"memit": "smollm2-135m"}, overrides={"*": TINY}, **GRID)


def _sweep(root, name, fields):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"sweep_dir": str(root / name), **fields}))
    return path


def _results(sweep_dir):
    """Every checkpoint's editing scores, by cell and number of edits."""
    out = {}
    for cell in CELLS:
        for point in POINTS:
            data = json.loads((sweep_dir / cell / f"memit/checkpoints/edits_{point:06d}/results.json").read_text())
            out[cell, point] = data["results"]["counterfact_edit_scores"]
    return out


class CellKiller(threading.Thread):
    """Kills the process running one cell (SIGKILL, as the OOM killer or a lost node would) once it
    has traced its first batch and before it finishes."""

    def __init__(self, cell_dir):
        super().__init__(daemon=True)
        self.cell_dir = cell_dir
        self.killed_pid = None
        self.stop = threading.Event()

    def run(self):
        trace = self.cell_dir / "memit" / "trace.jsonl"
        while not self.stop.is_set():
            if trace.exists() and trace.read_text().strip():
                pid = int((self.cell_dir / "memit" / ".lock").read_text())
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
                return
            time.sleep(0.02)


def _kill_a_cell_and_resume(root, executor, fields):
    """One cell's process is killed after its first batch: the sweep reports it failed, and a rerun
    skips the finished cells and resumes that one from its saved state."""
    from harness.cli import main as seqedit

    path = _sweep(root, executor, fields)
    args = ["sweep", "--config", str(path), "--executor", executor, "--jobs", "2"]
    killer = CellKiller(root / executor / VICTIM)
    killer.start()
    try:
        assert seqedit(args) == 1, executor  # the killed cell failed
        killer.stop.set()
        killer.join()
        assert killer.killed_pid is not None, executor
        victim = root / executor / VICTIM / "memit"
        assert not (victim / "checkpoints/edits_000004/results.json").exists()
        assert seqedit(args) == 0, executor
    finally:
        killer.stop.set()
    # the victim started twice, resumed (its trace holds each batch once) and the others once
    starts = {cell: (root / executor / cell / "memit/setup.jsonl").read_text().count("model_load_seconds")
              for cell in CELLS}
    assert starts == {cell: 2 if cell == VICTIM else 1 for cell in CELLS}, executor
    assert [json.loads(line)["batch"] for line in (victim / "trace.jsonl").read_text().splitlines()] == [0, 1]
    return _results(root / executor)


def test_sweeps_on_every_executor_resume_after_a_cell_is_killed_to_the_uninterrupted_results(tmp_path, capsys):
    """A 2 x 2 grid: uninterrupted through the local executor, then through the Slurm code path
    (submitit's local executor) and a local Ray instance, each with one cell killed mid-run and the
    sweep run again."""
    from harness.cli import main as seqedit

    fields = _sweep_fields(tmp_path)
    path = _sweep(tmp_path, "local", fields)
    assert seqedit(["sweep", "--config", str(path), "--jobs", "2"]) == 0
    sweep_dir = tmp_path / "local"
    for cell, (seed, lr) in zip(CELLS, [(s, lr) for s in (0, 1) for lr in (0.5, 1.0)]):
        config = json.loads((sweep_dir / cell / "manifest.json").read_text())["config"]
        assert config["seed"] == seed and config["overrides"]["*"]["v_lr"] == lr
    want = _results(sweep_dir)
    # the learning rate and the seed each change what the edits do
    assert want[CELLS[0], 4] != want[CELLS[1], 4] and want[CELLS[0], 4] != want[CELLS[2], 4]
    logs = {cell: (sweep_dir / "logs" / f"{cell}.log").read_text() for cell in CELLS}
    capsys.readouterr()
    # run again (as after a kill): finished cells are not started again, nothing is rewritten
    assert seqedit(["sweep", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(f"[sweep] {cell}: complete, skipped" in out for cell in CELLS)
    assert {cell: (sweep_dir / "logs" / f"{cell}.log").read_text() for cell in CELLS} == logs
    assert _results(sweep_dir) == want

    import ray

    got = {"submitit-local": _kill_a_cell_and_resume(tmp_path, "submitit-local", fields)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got["ray"] = _kill_a_cell_and_resume(tmp_path, "ray", fields)
    finally:
        ray.shutdown()
    # every checkpoint equals the uninterrupted sweep's (to float round-off: these executors give
    # each cell its own thread count)
    for executor, results in got.items():
        for key, table in want.items():
            for metric, value in table.items():
                assert results[key][metric] == (pytest.approx(value, rel=1e-4, abs=1e-8)
                                                if isinstance(value, float) else value), (executor, key, metric)


def test_slurm_dry_run_prints_the_sbatch_script_with_the_sweep_parameters(tmp_path, capsys):
    from harness.cli import main as seqedit

    path = _sweep_file(tmp_path, seed=[0, 1], num_edits=0, edit_batch_size=2, eval_every=2)
    assert seqedit(["sweep", "--config", str(path), "--executor", "slurm", "--jobs", "2", "--partition", "gpu",
                    "--gpus", "1", "--time_min", "240", "--dry_run"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240",
                 "#SBATCH --job-name=seqedit-sweep"):
        assert line in out
    assert "seed-0: seed=0" in out and not (tmp_path / "sweep").exists()
    # without --time_min a day, not submitit's five minutes (a long cell would only be requeued)
    assert seqedit(["sweep", "--config", str(path), "--executor", "slurm", "--dry_run"]) == 0
    assert "#SBATCH --time=1440" in capsys.readouterr().out


def test_committed_sweep_and_run_configs_expand_and_validate(monkeypatch):
    """The configs behind the committed long runs stay runnable: every cell of every sweep under
    harness/configs/sweeps, every run config under leaderboards/runs and every config under bench/
    passes validation."""
    import os
    from pathlib import Path

    from harness.runs.config import RunConfig

    repo = Path(__file__).resolve().parent.parent
    shared = repo.parent / "shared" / "data"
    if not (shared / "counterfact").exists():
        message = "../shared/data is not beside this checkout (the long runs edit its full data)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("SEQEDIT_DATA_DIR", str(shared))
    sweeps = sorted((repo / "harness" / "configs" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        assert len(expand(*read_sweep(path))) > 1, path
    runs = sorted((repo / "leaderboards" / "runs").glob("*.yaml"))
    assert len(runs) >= 4
    for path in runs:
        RunConfig.from_sources(str(path), {})
    # the benchmarks' configs too: runs, or sweeps where they name a sweep_dir
    for path in sorted((repo / "bench").glob("*.yaml")):
        if "sweep_dir" in yaml.safe_load(path.read_text()):
            assert expand(*read_sweep(path)), path
        else:
            RunConfig.from_sources(str(path), {})
