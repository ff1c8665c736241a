"""Seconds of one checkpoint's evaluation as a run grows: the driver's own ``evaluate`` with the
records of a 10,000-edit run's stream marked as edited, at several run lengths.

    python bench/checkpoint_cost.py                                   # at 1,000 and 9,000 edits
    python bench/checkpoint_cost.py --at 1000,5000,9000 --json cost.json

What a checkpoint costs does not depend on what the edits did to the weights (the same prompts,
the same number of generated tokens: fluency generates a fixed length), so the records are marked
as edited without editing, and a checkpoint deep into a run is measured without the hours of
editing before it. The run config (default: the 10,000-edit runs') gives the tasks, the sample
sizes and the lm-eval batch size. A checkpoint that is not the run's last scores a stratified
sample (``eval_sample``, ``fluency_sample``); ``--final`` scores every edited record as the last
checkpoint does. One untimed warm-up checkpoint on a tiny sample comes first, as a real run's
first checkpoint pays lm-eval's task indexing before the ones measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _wrapper(cfg):
    from lm_eval.api.registry import get_model

    import harness.models  # noqa: F401  (registers the wrappers)

    # evaluation is the same for every method's wrapper; MEMIT's loads without editor state
    cls = get_model("memit_hf")
    return cls(pretrained=cfg.model, edit_data=cfg.edit_data, num_edits=0, edit_batch_size=cfg.edit_batch_size,
               seed=cfg.seed, cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device,
               zsre_target=cfg.zsre_target, progress=False, batch_size=cfg.eval_batch_size)


def _checkpoint(lm, cfg, n_edited: int, final: bool, manager) -> tuple[float, dict]:
    from harness.runs.evaluation import evaluate

    lm.edited_requests = list(lm.stream[:n_edited])
    lm.edited_dataset = lm.stream[0].dataset
    t0 = time.perf_counter()
    results = evaluate(lm, cfg, manager, final=final)
    return time.perf_counter() - t0, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "leaderboards" / "runs" / "counterfact_10k.yaml"))
    p.add_argument("--at", default="1000,9000", help="numbers of edited records, comma-separated")
    p.add_argument("--final", action="store_true", help="score every edited record, as the last checkpoint")
    p.add_argument("--data_dir", default=os.environ.get("SEQEDIT_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", help="write the timings to this file")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    os.environ.setdefault("SEQEDIT_DATA_DIR", args.data_dir)

    from harness.runs.config import RunConfig
    from harness.runs.evaluation import task_manager_for

    cfg = RunConfig.from_sources(args.config, {})
    points = [int(x) for x in args.at.split(",")]
    if max(points) > cfg.num_edits:
        raise SystemExit(f"--at {max(points)} is past the run's num_edits ({cfg.num_edits})")
    lm = _wrapper(cfg)
    manager = task_manager_for(cfg)
    print(f"torch threads: {torch.get_num_threads()}  tasks: {','.join(cfg.tasks)}  eval_sample: "
          f"{cfg.eval_sample}  fluency_sample: {cfg.fluency_sample}  final: {args.final}", flush=True)
    warm = dataclasses.replace(cfg, edit_batch_size=2, eval_sample=4, fluency_sample=1, limit=2)
    _checkpoint(lm, warm, cfg.edit_batch_size, False, manager)
    rows = []
    for n in points:
        seconds, results = _checkpoint(lm, cfg, n, args.final, manager)
        per_task = {t: round(s, 1) for t, s in results["evaluation_seconds"].items()}
        scored = {t: len(s["case_ids"]) for t, s in results["seqedit"]["evaluation_sample"].items()}
        rows.append({"edited": n, "seconds": round(seconds, 1), "per_task": per_task, "records_scored": scored})
        print(f"{n:>6} edited: {seconds:7.1f} s  " + "  ".join(f"{t} {s:.0f} s" for t, s in per_task.items())
              + "  scored " + ", ".join(f"{t} {k}" for t, k in scored.items()), flush=True)
    if len(rows) > 1:
        first, last = rows[0]["seconds"], rows[-1]["seconds"]
        print(f"at {points[-1]} edits / at {points[0]}: {last / first:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
