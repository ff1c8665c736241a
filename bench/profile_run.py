"""Where the time of a sequential run went: a Markdown table per method of a run directory.

    seqedit run --config bench/profile_1000.yaml      # 1,000 CounterFact edits, batch 100
    python bench/profile_run.py ~/seqedit-runs/profile-1000

Phases: model load and editor preparation (context templates, key statistics, projectors) from
``<method>/setup.jsonl``; keys, targets, solve and write summed over ``trace.jsonl``; each
evaluation task's seconds at each checkpoint from its ``results.json``. Memory: the resident set
size after the first and the last batch and the peak, from the trace.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def profile(method_dir: Path) -> list[str]:
    setup = _lines(method_dir / "setup.jsonl")
    trace = _lines(method_dir / "trace.jsonl")
    rows: list[tuple[str, float]] = []
    for key, label in (("model_load_seconds", "model load"), ("prepare_seconds", "prepare (statistics, templates)")):
        values = [entry[key] for entry in setup if key in entry]
        if values:
            rows.append((label, sum(values)))
    phases: dict[str, float] = {}
    for record in trace:
        for name, seconds in record.get("phase_seconds", {}).items():
            phases[name] = phases.get(name, 0.0) + seconds
    edits = trace[-1]["edits_done"] if trace else 0
    for name in ("keys", "targets", "solve", "write"):
        if name in phases:
            rows.append((f"editing: {name}", phases[name]))
    checkpoints = sorted((method_dir / "checkpoints").glob("edits_*/results.json"))
    for path in checkpoints:
        results = json.loads(path.read_text())
        point = results.get("seqedit", {}).get("num_edits")
        for task, seconds in results.get("seqedit", {}).get("evaluation_seconds", {}).items():
            rows.append((f"evaluation at {point} edits: {task}", seconds))
    total = sum(seconds for _, seconds in rows)
    out = [f"### {method_dir.name}: {edits} edits", "",
           "| phase | seconds | share |", "|---|---|---|"]
    out += [f"| {label} | {seconds:.0f} | {100 * seconds / total:.1f}% |" for label, seconds in rows]
    out.append(f"| total | {total:.0f} | |")
    if edits:
        editing = sum(phases.get(n, 0.0) for n in ("keys", "targets", "solve", "write"))
        out.append(f"\nEditing: {editing / edits:.2f} s/edit.")
    rss = [r["rss_mb"] for r in trace if "rss_mb" in r]
    peaks = [r["peak_rss_mb"] for r in trace if "peak_rss_mb" in r]
    if rss:
        out.append(f"RSS after batch 1: {rss[0]:.0f} MB, after the last batch: {rss[-1]:.0f} MB, "
                   f"largest after a batch: {max(rss):.0f} MB" + (f", peak: {max(peaks):.0f} MB." if peaks else "."))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    run = Path(args.run_dir).expanduser()
    methods = sorted(d for d in run.iterdir() if (d / "trace.jsonl").exists())
    if not methods:
        raise SystemExit(f"{run}: no method directory with a trace.jsonl")
    for method_dir in methods:
        print("\n".join(profile(method_dir)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
