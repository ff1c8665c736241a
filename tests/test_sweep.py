"""seqedit sweep: grid expansion and the local executor on a tiny model."""

import json

import pytest
import yaml
from test_driver import TINY

from harness.errors import ConfigError
from harness.sweep import expand, read_sweep


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


def test_local_sweep_runs_every_cell_and_a_rerun_resumes_without_redoing_them_and_submitit_and_ray_agree(tmp_path):
    from test_driver import tiny_model

    from harness.cli import main as seqedit

    model_dir = tmp_path / "tiny"
    model, tok = tiny_model("llama")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    path = _sweep_file(tmp_path, model=str(model_dir), model_name="tiny-llama", methods=["memit"],
                       edit_data="counterfact", num_edits=2, edit_batch_size=2, eval_every=2,
                       tasks=["counterfact_edit_scores"], seed=[0, 1], device="cpu",
                       cache_dir=str(tmp_path / "cache"), hparams={"memit": "smollm2-135m"},
                       overrides={"memit": TINY})
    assert seqedit(["sweep", "--config", str(path), "--jobs", "2"]) == 0
    results = {}
    for seed in (0, 1):
        cell = tmp_path / "sweep" / f"seed-{seed}"
        manifest = json.loads((cell / "manifest.json").read_text())
        assert manifest["config"]["seed"] == seed
        results[seed] = (cell / "memit/checkpoints/edits_000002/results.json").read_text()
    # run again (as after a kill): finished cells only say so, and nothing is rewritten
    assert seqedit(["sweep", "--config", str(path)]) == 0
    assert "complete: all 2 checkpoints on disk" in (tmp_path / "sweep/logs/seed-0.log").read_text()
    assert all((tmp_path / "sweep" / f"seed-{s}/memit/checkpoints/edits_000002/results.json").read_text()
               == results[s] for s in (0, 1))

    # the Slurm code path, on this machine through submitit's local executor: the same results (to
    # float round-off: the local executor gave each of its two processes one thread)
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "sweep_dir": str(tmp_path / "via_submitit")}))
    assert seqedit(["sweep", "--config", str(path), "--executor", "submitit-local"]) == 0
    # and through a local Ray instance, one task per cell
    import ray

    path.write_text(yaml.safe_dump({**config, "sweep_dir": str(tmp_path / "via_ray")}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert seqedit(["sweep", "--config", str(path), "--executor", "ray", "--jobs", "2"]) == 0
    finally:
        ray.shutdown()
    for via in ("via_submitit", "via_ray"):
        for seed in (0, 1):
            got = json.loads((tmp_path / f"{via}/seed-{seed}/memit/checkpoints/edits_000002/results.json").read_text())
            want = json.loads(results[seed])["results"]["counterfact_edit_scores"]
            for key, value in got["results"]["counterfact_edit_scores"].items():
                assert value == (pytest.approx(want[key], rel=1e-4, abs=1e-8) if isinstance(value, float)
                                 else want[key]), (via, seed, key)


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


def test_committed_sweep_and_run_configs_expand_and_validate(monkeypatch):
    """The configs behind the committed long runs stay runnable: every cell of every sweep under
    harness/configs/sweeps and every run config under leaderboards/runs passes validation."""
    import os
    from pathlib import Path

    from harness.driver import RunConfig

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
