"""``seqedit status``: where a run or a sweep stands, read from its files (also while it runs).

One line per method: whether a process is editing it, the edits traced so far, the checkpoints on
disk, the newest checkpoint's headline scores, the recent seconds per edit and the hours left;
below the table, a warning for each unfinished method whose edits are running away
(:mod:`harness.runs.runaway`).
Nothing is locked or written, so it is safe to call on a directory a run is writing.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.runs.config import RunConfig
from harness.runs.driver import checkpoint_costs, checkpoint_results_path
from harness.runs.resultsdir import (
    EDITING_METRICS,
    PERPLEXITY,
    Checkpoint,
    MethodRun,
    RunDirError,
    load_runs,
)
from harness.runs.runaway import runaway_layers
from harness.runs.storage import checkpoint_problem, process_alive

RECENT_BATCHES = 5  # the rate of the last few batches: a resume or a slower phase shows at once
HEADLINE = ("efficacy", "generalization", "specificity")


@dataclass
class MethodStatus:
    run: str
    method: str
    state: str  # "complete", "running (pid N)", "stopped" or "not started"
    edits_traced: int
    num_edits: int
    checkpoints_done: list[int]
    checkpoints: list[int]
    latest: str  # the newest checkpoint's headline scores, "" before any
    seconds_per_edit: float | None
    hours_left: float | None
    warnings: list[str] = dataclasses.field(default_factory=list)


def _config(config: dict) -> RunConfig:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in config.items() if k in known})


def _holder(method_dir: Path) -> int | None:
    """The process editing this method: the id the lock file holds, if that process is alive (the
    file keeps the id of a process that died; reading it takes no lock)."""
    try:
        pid = int((method_dir / ".lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _headline(edits: int, checkpoint: Checkpoint, dataset: str | None) -> str:
    scores = checkpoint.editing()
    parts = [f"{spec.name[:3]} {scores[spec.key].mean:.1f}" for spec in EDITING_METRICS
             if spec.name in HEADLINE and spec.dataset.name == dataset and spec.key in scores]
    perplexity = checkpoint.measurement(*PERPLEXITY)
    if perplexity is not None:
        parts.append(f"ppl {perplexity.mean:,.1f}")
    return f"{edits:,}: " + " ".join(parts)


def method_status(run_name: str, method: str, method_dir: Path, cfg: RunConfig,
                  found: MethodRun | None) -> MethodStatus:
    points = cfg.checkpoints()
    done = [p for p in points if checkpoint_problem(checkpoint_results_path(method_dir, p), method, p) is None]
    trace = found.trace if found else []
    edits = int(trace[-1].get("edits_done", 0)) if trace else 0
    recent = [b for b in trace[-RECENT_BATCHES:] if b.get("edit_seconds") and b.get("batch_size")]
    rate = (sum(b["edit_seconds"] for b in recent) / sum(b["batch_size"] for b in recent)) if recent else None
    holder = _holder(method_dir) if method_dir.is_dir() else None
    if len(done) == len(points):
        state = "complete"
    elif holder is not None:
        state = f"running (pid {holder})"
    else:
        state = "stopped" if edits or done else "not started"
    hours = None
    if state != "complete" and rate is not None:
        costs = checkpoint_costs(method_dir, points, cfg.num_edits)
        seconds = (cfg.num_edits - edits) * rate
        if costs:
            earlier = sum(1 for p in points if p not in done and p != cfg.num_edits)
            seconds += earlier * costs[0] + (cfg.num_edits not in done) * costs[1]
        hours = seconds / 3600
    latest = ""
    if found and found.checkpoints:
        newest = max(found.checkpoints)
        latest = _headline(newest, found.checkpoints[newest], found.dataset)
    # a finished run's last batches are history; one still editing is told while it can be stopped
    runaways = [] if state == "complete" else [r.describe() for r in runaway_layers(trace)]
    return MethodStatus(run_name, method, state, edits, cfg.num_edits, done, points, latest, rate, hours, runaways)


def collect(path: Path) -> list[MethodStatus]:
    statuses = []
    for run in load_runs([path]):
        cfg = _config(run.config)
        by_method = {m.method: m for m in run.methods}
        for method in cfg.methods:
            statuses.append(method_status(run.name, method, run.path / method, cfg, by_method.get(method)))
    return statuses


def render(statuses: list[MethodStatus]) -> str:
    header = ("run", "method", "state", "edits", "checkpoints", "newest checkpoint", "s/edit", "left")
    rows = [header]
    for s in statuses:
        rows.append((s.run, s.method, s.state, f"{s.edits_traced:,}/{s.num_edits:,}",
                     f"{len(s.checkpoints_done)}/{len(s.checkpoints)}", s.latest or "-",
                     f"{s.seconds_per_edit:.2f}" if s.seconds_per_edit is not None else "-",
                     f"{s.hours_left:.1f} h" if s.hours_left is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"warning: {s.run}/{s.method}: {w}" for s in statuses for w in s.warnings]
    timed = [s.hours_left for s in statuses if s.hours_left is not None]
    untimed = sum(1 for s in statuses if s.state == "not started")
    if len(timed) > 1 or (timed and untimed):
        lines.append(f"left: about {sum(timed):.1f} h for the methods with a rate, one after another"
                     + (f"; {untimed} not started (no rate yet)" if untimed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqedit status", description=(
        "Where a run or sweep directory stands: per method, whether a process is editing it, edits "
        "traced, checkpoints on disk, the newest checkpoint's scores and the time left. Reads only."))
    p.add_argument("paths", nargs="+", help="run directories (output_dir) or sweep directories")
    args = p.parse_args(argv)
    for raw in args.paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise RunDirError(f"{path}: no such directory; pass a run's output_dir or a sweep directory")
        with warnings.catch_warnings():  # a trace line being written as we read is no news here
            warnings.simplefilter("ignore")
            statuses = collect(path)
        print(render(statuses))
    return 0
