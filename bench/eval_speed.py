"""Records per second of each evaluation task on the embedded SmolLM2, as the driver runs them.

    python bench/eval_speed.py                              # 40 CounterFact, 40 ZsRE records, edit_glue
    python bench/eval_speed.py --records 100 --tasks counterfact_edit_scores --json eval.json

The wrapper is the driver's (``memit_hf``, lm-eval batch size ``--batch_size``, default the
driver's ``eval_batch_size``); the first ``--records`` records of the edit stream are marked as
edited without touching the weights, so the editing tasks score them exactly as at a checkpoint.
General-capability tasks run with ``limit=--glue_limit`` documents per subtask. Each task is
timed alone, lm-eval's own request building and metric computation included, after one untimed
warm-up evaluation. ``--metrics_json`` writes every metric value too, so that two versions of
the code can be compared for identical results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "counterfact_edit_scores,counterfact_edit_generation,zsre_edit,edit_glue"


def _wrapper(edit_data: str, batch_size: int):
    from harness.models import MEMITLM

    return MEMITLM(edit_data=edit_data, num_edits=0, progress=False, batch_size=batch_size)


def _evaluate(lm, task: str, limit, seed: int = 0) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness import tasks_dir

    manager = TaskManager(include_path=tasks_dir(), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, bootstrap_iters=0)


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if k != "alias" and isinstance(v, (int, float))}
            for task, values in results["results"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--records", type=int, default=40, help="edited records the editing tasks score")
    p.add_argument("--glue_limit", type=int, default=20, help="documents per edit_glue subtask")
    p.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size (the driver's default)")
    p.add_argument("--data_dir", default=os.environ.get("SEQEDIT_DATA_DIR")
                   or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--json", help="write the timings to this file")
    p.add_argument("--metrics_json", help="write every metric value to this file")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    os.environ.setdefault("SEQEDIT_DATA_DIR", args.data_dir)
    wrappers: dict[str, object] = {}
    rows, metrics = [], {}
    print(f"torch threads: {torch.get_num_threads()}  records: {args.records}  lm-eval batch size: {args.batch_size}")
    for task in args.tasks.split(","):
        dataset = "zsre" if task.startswith("zsre") else "counterfact"
        if dataset not in wrappers:
            lm = _wrapper(f"{dataset}:full", args.batch_size)
            lm.edited_requests = list(lm.stream[:args.records])
            lm.edited_dataset = dataset
            wrappers[dataset] = lm
        lm = wrappers[dataset]
        editing = task.startswith(("counterfact_edit", "zsre_edit"))
        limit = None if editing else args.glue_limit
        _evaluate(lm, task, 2)  # warm-up: task index, tokenizer caches, first-call allocations
        t0 = time.perf_counter()
        res = _evaluate(lm, task, limit)
        seconds = time.perf_counter() - t0
        docs = sum(int(v.get("effective", v.get("original", 0))) for v in res.get("n-samples", {}).values())
        row = {"task": task, "documents": docs, "seconds": seconds, "documents_per_s": docs / seconds}
        rows.append(row)
        metrics.update(_metrics(res))
        print(f"{task:<30}{docs:>6} docs {seconds:>8.1f} s {row['documents_per_s']:>8.2f} docs/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
