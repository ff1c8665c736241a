"""``seqedit sweep``: a grid of sequential runs, one run directory per cell.

A sweep config is a run config (``harness.runs.config.RunConfig`` fields) plus ``sweep_dir``, where any
field may hold several values:

* a scalar field given as a list is an axis (``seed: [0, 1, 2]``);
* a list field (``methods``, ``tasks``, ``eval_at``) is an axis when given as a list of lists
  (``methods: [[memit], [lyaplock]]``);
* ``grid:`` names further axes by dotted path, for values inside mappings
  (``grid: {overrides.lyaplock.alpha: [10, 60]}``).

Executors: ``local`` (processes on this machine), ``slurm`` (submitit, one job array; a preempted
or timed-out job requeues and resumes), ``submitit-local`` (that code path on this machine) and
``ray`` (one Ray task per cell with its CPU/GPU request, on $RAY_ADDRESS or a local Ray).

Every combination is a cell: its run directory is ``<sweep_dir>/<cell name>``, its config is
written to ``<sweep_dir>/configs/<cell name>.yaml`` and its log to ``<sweep_dir>/logs/``. Every cell
is validated before any runs. The local executor runs at most ``--jobs`` cells at a time, each as
its own ``seqedit run --resume`` process, so a killed sweep resumes: a rerun skips the finished
cells (without starting anything for them) and the interrupted ones continue from their last
saved batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.errors import ConfigError

LIST_FIELDS = ("methods", "tasks", "eval_at")
# slurm: submitted through submitit (the optional extra .[slurm]); submitit-local: the same code path
# on this machine through submitit's local executor (what the tests run, and a dry run for a cluster)
EXECUTORS = ("local", "slurm", "submitit-local", "ray")
DEFAULT_TIME_MIN = 24 * 60


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict  # axis path -> this cell's value
    config: dict  # a complete run config, as its file is written
    run: object  # the same, validated (a RunConfig)


def _run_fields() -> set[str]:
    from harness.runs.config import RunConfig

    return {f.name for f in dataclasses.fields(RunConfig)}


def read_sweep(path: str | Path) -> tuple[Path, dict, list[tuple[str, list]]]:
    """(sweep directory, base run config, axes) of a sweep config file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict) or "sweep_dir" not in data:
        raise ConfigError(f"--config {path}: a sweep config is a mapping of run-config fields with a sweep_dir")
    sweep_dir = Path(str(data.pop("sweep_dir"))).expanduser()
    grid = data.pop("grid", {}) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid must map dotted paths to lists of values, got {grid!r}")
    axes = []
    for name, value in list(data.items()):
        if name in LIST_FIELDS:
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                axes.append((name, value))
                data.pop(name)
        elif isinstance(value, list):
            axes.append((name, value))
            data.pop(name)
    for path_, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{path_} must be a non-empty list of values, got {values!r}")
        axes.append((str(path_), values))
    for path_, values in axes:
        if not values:
            raise ConfigError(f"{path_}: an empty list gives no cells")
    if "output_dir" in data:
        raise ConfigError("a sweep config sets sweep_dir; each cell's output_dir is <sweep_dir>/<cell name>")
    return sweep_dir, data, axes


def _set(config: dict, path_: str, value) -> None:
    keys = path_.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"grid path {path_}: {key} is not a mapping in the run config")
    node[keys[-1]] = value


def _token(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.,+-]+", "-", text).strip("-") or "none"


def expand(sweep_dir: Path, base: dict, axes: list[tuple[str, list]]) -> list[Cell]:
    """Every combination of the axes' values, each a validated run config."""
    from harness.runs.config import RunConfig

    cells = []
    for combo in itertools.product(*(values for _, values in axes)):
        config = copy.deepcopy(base)
        values = {}
        for (path_, _), value in zip(axes, combo):
            _set(config, path_, copy.deepcopy(value))
            values[path_] = value
        name = "_".join(f"{path_.split('.')[-1]}-{_token(v)}" for path_, v in values.items()) or "single"
        config["output_dir"] = str(sweep_dir / name)
        unknown = set(config) - _run_fields()
        if unknown:
            raise ConfigError(f"cell {name}: unknown run-config field(s) {sorted(unknown)}")
        run = RunConfig(**copy.deepcopy(config))
        try:
            run.validate()
        except ConfigError as exc:
            raise ConfigError(f"cell {name}: {exc}") from None
        cells.append(Cell(name, values, config, run))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("two cells get the same name: give the axes values that differ as text")
    return cells


def write_configs(sweep_dir: Path, cells: list[Cell]) -> list[Path]:
    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in cells:
        path = sweep_dir / "configs" / f"{cell.name}.yaml"
        path.write_text(yaml.safe_dump(cell.config, sort_keys=False))
        paths.append(path)
    return paths


class CellJob:
    """One cell as a submitit job. When Slurm preempts it or its time runs out, submitit calls
    ``checkpoint``, which requeues the same job; the driver's ``--resume`` then continues the cell
    from its last saved batch."""

    def __init__(self, config_path: str | Path):
        self.config_path = str(config_path)

    def __call__(self) -> int:
        from harness.runs.driver import main as run_main

        rc = run_main(["--config", self.config_path, "--resume", "--no_progress"])
        if rc != 0:
            raise RuntimeError(f"seqedit run --config {self.config_path} exited with status {rc}")
        return rc

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.config_path))


def slurm_parameters(jobs: int, partition: str | None = None, gpus: int | None = None,
                     time_min: int | None = None, cpus: int | None = None) -> dict:
    """submitit's parameters for a sweep: one task per cell, at most ``jobs`` cells at a time."""
    params = {"slurm_array_parallelism": jobs, "slurm_partition": partition, "gpus_per_node": gpus,
              "timeout_min": time_min, "cpus_per_task": cpus, "nodes": 1, "tasks_per_node": 1}
    return {k: v for k, v in params.items() if v is not None}


def sbatch_preview(sweep_dir: Path, params: dict) -> str:
    """The sbatch script submitit writes for these parameters (without submitting anything)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command="python -m submitit.core._submit <folder>", folder=str(sweep_dir / "submitit" / "%j"),
        job_name="seqedit-sweep", partition=params.get("slurm_partition"), time=params.get("timeout_min", 5),
        gpus_per_node=params.get("gpus_per_node"), cpus_per_task=params.get("cpus_per_task"),
        array_parallelism=params.get("slurm_array_parallelism", 256))


def run_submitit(sweep_dir: Path, cells: list[Cell], cluster: str, params: dict, progress=print) -> dict[str, int]:
    """Submit one job per cell through submitit (``cluster`` "slurm" or "local") and wait for them."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm executor needs submitit: pip install 'seqedit-harness[slurm]'") from None
    paths = write_configs(sweep_dir, cells)
    executor = submitit.AutoExecutor(folder=sweep_dir / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(name="seqedit-sweep", **({k: v for k, v in params.items() if not k.startswith(
        "slurm_")} if cluster != "slurm" else params))
    if cluster == "slurm":
        with executor.batch():  # one job array, throttled to slurm_array_parallelism
            jobs = [executor.submit(CellJob(p)) for p in paths]
    else:
        jobs = [executor.submit(CellJob(p)) for p in paths]
    for cell, job in zip(cells, jobs):
        progress(f"[sweep] {cell.name}: submitted as job {job.job_id}")
    status = {}
    for cell, job in zip(cells, jobs):
        try:
            job.result()
            status[cell.name] = 0
            progress(f"[sweep] {cell.name}: done")
        except Exception as exc:  # the job's own error, as submitit reports it
            status[cell.name] = 1
            progress(f"[sweep] {cell.name}: failed ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r})")
    return status


def _cell_command(config_path) -> list[str]:
    """The ``seqedit run --resume`` command of one cell."""
    return [sys.executable, "-m", "harness.cli", "run", "--config", str(config_path), "--resume", "--no_progress"]


def _cell_process(config_path: str, log_path: str, threads: int) -> int:
    """One cell in its own process, its output in the cell's log (a Ray task)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "a") as log:
        return subprocess.run(_cell_command(config_path), stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_ray(sweep_dir: Path, cells: list[Cell], jobs: int, cpus: int | None, gpus: int | None,
            progress=print) -> dict[str, int]:
    """One Ray task per cell with its resource request, at most ``jobs`` in flight, on the cluster
    at $RAY_ADDRESS, on a Ray already started in this process, or else on a local Ray."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'seqedit-harness[ray]'") from None
    paths = write_configs(sweep_dir, cells)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    cpus = cpus or 1
    task = ray.remote(num_cpus=cpus, num_gpus=gpus or 0)(_cell_process)
    waiting = list(zip(cells, paths))
    running: dict = {}
    status: dict[str, int] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                cell, path = waiting.pop(0)
                ref = task.remote(str(path), str(sweep_dir / "logs" / f"{cell.name}.log"), cpus)
                running[ref] = cell
                progress(f"[sweep] {cell.name}: submitted to Ray")
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                cell = running.pop(ref)
                try:
                    status[cell.name] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died: the cell resumes on a rerun
                    status[cell.name] = 1
                    progress(f"[sweep] {cell.name}: Ray task failed ({type(exc).__name__})")
                rc = status[cell.name]
                progress(f"[sweep] {cell.name}: {'done' if rc == 0 else f'failed (exit {rc}), see logs/{cell.name}.log'}")
    finally:
        if started_here:
            ray.shutdown()
    return status


def run_local(sweep_dir: Path, cells: list[Cell], jobs: int, progress=print) -> dict[str, int]:
    """Run the cells as ``seqedit run --resume`` processes, at most ``jobs`` at a time; their
    exit statuses by cell name."""
    config_paths = dict(zip((c.name for c in cells), write_configs(sweep_dir, cells)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    waiting = list(cells)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    status: dict[str, int] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                cell = waiting.pop(0)
                config_path = config_paths[cell.name]
                log = open(sweep_dir / "logs" / f"{cell.name}.log", "a")
                running[cell.name] = (subprocess.Popen(_cell_command(config_path), stdout=log,
                                                       stderr=subprocess.STDOUT, env=env), log)
                progress(f"[sweep] {cell.name}: started")
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    status[name] = proc.returncode
                    del running[name]
                    progress(f"[sweep] {name}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode}), see logs/{name}.log'}")
            time.sleep(0.2)
    finally:
        for proc, log in running.values():  # a killed sweep takes its cells with it
            proc.terminate()
            log.close()
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqedit sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep config YAML")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="where the cells run (default: local)")
    p.add_argument("--jobs", type=int, default=1, help="cells at a time on this machine (default: 1)")
    p.add_argument("--dry_run", action="store_true",
                   help="list the cells (and for slurm print the sbatch script) without running (default: off)")
    slurm = p.add_argument_group("slurm (through submitit) and ray")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--gpus", type=int, help="GPUs per cell, for Slurm and Ray (default: none)")
    # submitit's own default is 5 minutes: every long cell would spend its life being requeued
    slurm.add_argument("--time_min", type=int, default=DEFAULT_TIME_MIN,
                       help="time limit per job in minutes, Slurm and submitit-local; a cell that runs out is "
                       f"requeued (up to 3 times) and resumes from its last saved batch (default: {DEFAULT_TIME_MIN})")
    slurm.add_argument("--cpus", type=int, help="CPUs per cell, for Slurm and Ray (default: the cluster's; Ray: 1)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    sweep_dir, base, axes = read_sweep(args.config)
    cells = expand(sweep_dir, base, axes)
    print(f"[sweep] {len(cells)} cells under {sweep_dir}")
    params = slurm_parameters(args.jobs, args.partition, args.gpus, args.time_min, args.cpus)
    if args.dry_run:
        for cell in cells:
            print(f"  {cell.name}: " + ", ".join(f"{k}={v}" for k, v in cell.values.items()))
        if args.executor == "slurm":
            print(sbatch_preview(sweep_dir, params))
        return 0
    from harness.runs.driver import run_is_complete

    # a finished cell is not dispatched again: on a cluster a rerun would otherwise queue a job
    # per finished cell only to have it report itself complete
    todo = []
    for cell in cells:
        if run_is_complete(cell.run):
            print(f"[sweep] {cell.name}: complete, skipped")
        else:
            todo.append(cell)
    if not todo:
        status = {}
    elif args.executor == "local":
        status = run_local(sweep_dir, todo, args.jobs)
    elif args.executor == "ray":
        status = run_ray(sweep_dir, todo, args.jobs, args.cpus, args.gpus)
    else:
        status = run_submitit(sweep_dir, todo, "slurm" if args.executor == "slurm" else "local", params)
    failed = sorted(name for name, rc in status.items() if rc != 0)
    print(f"[sweep] {len(cells) - len(failed)} of {len(cells)} cells complete"
          + (f"; failed: {', '.join(failed)} (rerun the same command to resume them)" if failed else ""))
    return 1 if failed else 0
