"""One checkpoint's evaluation: lm-eval on the in-memory model, the editing tasks on a stratified
sample of the edited records, in chunks that a killed run resumes from."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.runs.config import EDITING_TASK_PREFIXES, RunConfig
from harness.runs.sampling import (
    RETENTION_METRICS,
    SamplePlan,
    plan_sample,
    retention,
    stratified_mean,
)
from harness.runs.storage import atomic_write_text, json_default


def task_manager_for(cfg: RunConfig):
    """One TaskManager per run. When every task is ours, lm-eval's own catalogue (thousands of
    YAML files, seconds to index) is left out."""
    from lm_eval.tasks import TaskManager

    from harness import tasks_dir

    ours = {p.name for p in Path(tasks_dir()).iterdir() if p.is_dir()}
    only_ours = all(any(t == d or t.startswith(d + "_") or t.startswith(d) for d in ours) for t in cfg.tasks)
    return TaskManager(include_path=tasks_dir(), include_defaults=not only_ours, metadata=dict(cfg.task_metadata))


# the editing tasks whose records a checkpoint samples, and the run-config field that sizes each
SAMPLED_TASKS = {"counterfact_edit_scores": "eval_sample", "zsre_edit_scores": "eval_sample",
                 "counterfact_edit_generation": "fluency_sample"}


def evaluation_plans(cfg: RunConfig, n_records: int, final: bool) -> dict[str, SamplePlan]:
    """The sample each budget field gives at a checkpoint over ``n_records`` records in edit order.
    The scores keep the whole first batch; fluency spreads its smaller sample over the tenths."""
    return {field_: plan_sample(n_records, getattr(cfg, field_),
                                cfg.edit_batch_size if field_ == "eval_sample" else 0, cfg.seed, complete=final)
            for field_ in ("eval_sample", "fluency_sample")}


# records of an editing task per lm-eval call: a checkpoint that scores every one of 10,000 edited
# records takes hours, and a killed evaluation resumes from its last finished chunk
EVAL_CHUNK = 1000


def _evaluation_units(cfg: RunConfig, editing: list[str], plans: dict[str, SamplePlan], n_planned: int):
    """(name, lm-eval task, limit, sample positions or None) of every lm-eval call of a checkpoint,
    in order. A sampled editing group runs as its subtasks, each in chunks of ``EVAL_CHUNK``."""
    for task in cfg.tasks:
        if task not in editing:
            yield task, task, cfg.limit, None
            continue
        subtasks = [t for t in SAMPLED_TASKS if t == task or t.startswith(task + "_")]
        if not plans or not subtasks:
            # not sampled: the records edited so far (before any edit, the ones the run will edit)
            yield task, task, n_planned or None, None
            continue
        for sub in subtasks:
            positions = plans[SAMPLED_TASKS[sub]].positions
            for k in range(0, len(positions), EVAL_CHUNK):
                yield f"{sub}.{k // EVAL_CHUNK:04d}", sub, None, positions[k:k + EVAL_CHUNK]


def evaluate(lm, cfg: RunConfig, task_manager=None, final: bool = True, partial_dir: Path | None = None) -> dict:
    """lm-eval on the in-memory model: editing tasks on a stratified sample of the edited records
    (``harness.runs.sampling``; every record when ``final``), the rest with ``limit``.

    Before the first edit the editing tasks score the records this run is going to edit (the
    first ``num_edits`` of the stream, sampled alike): the pre-edited row of the same facts.
    With ``partial_dir`` each lm-eval call's output is kept there as it finishes and reused by a
    later call for the same checkpoint (a run killed in the middle of an evaluation)."""
    import lm_eval

    task_manager = task_manager or task_manager_for(cfg)
    editing = [t for t in cfg.tasks if t.startswith(EDITING_TASK_PREFIXES)]
    order = [r.case_id for r in (lm.edited_requests if lm.num_edited else lm.stream[: cfg.num_edits])]
    plans = evaluation_plans(cfg, len(order), final) if order else {}
    merged: dict = {"seqedit": {"evaluation_sample": {}, "retention": {}}}
    seconds: dict[str, float] = {}
    chunks: dict[str, list[dict]] = {}  # sampled subtask -> its chunks' lm-eval outputs
    for name, task, limit, positions in _evaluation_units(cfg, editing, plans, len(order)):
        partial = partial_dir / f"{name}.json" if partial_dir is not None else None
        res = _read_partial(partial)
        if res is None:
            # one call per task (or chunk): its cost is measured on its own, and its seeds do not
            # depend on which other tasks the run lists
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], limit=limit, samples={task: positions} if positions is not None else None,
                num_fewshot=cfg.num_fewshot, log_samples=cfg.log_samples or positions is not None,
                task_manager=task_manager,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed, confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
            )
            res["evaluation_seconds"] = time.perf_counter() - t0
            if partial is not None:
                atomic_write_text(partial, json.dumps(res, default=json_default))
        seconds[task] = seconds.get(task, 0.0) + res.pop("evaluation_seconds", 0.0)
        if positions is None:
            _merge_results(merged, res)
        else:
            chunks.setdefault(task, []).append(res)
    for task, parts in chunks.items():
        res = _join_chunks(task, parts)
        _estimate_from_sample(res, plans, order, cfg, merged["seqedit"], edited=bool(lm.num_edited))
        if not cfg.log_samples:
            res.pop("samples", None)
        _merge_results(merged, res)
    merged["evaluation_seconds"] = seconds
    return merged


def _read_partial(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # cut short by a crash: computed again
    return res if isinstance(res, dict) and "results" in res else None


def _join_chunks(task: str, parts: list[dict]) -> dict:
    """One lm-eval output for ``task`` from the outputs of its chunks: every chunk's logged
    samples, and the counts of all of them (the means are estimated afterwards from the samples)."""
    res = parts[-1]
    if len(parts) > 1:
        res["samples"] = {task: [doc for p in parts for doc in p["samples"][task]]}
        n = len(res["samples"][task])
        res.setdefault("n-samples", {})[task] = {**res.get("n-samples", {}).get(task, {}), "effective": n}
        # lm-eval's per-task count is the last chunk's
        if "sample_len" in res.get("results", {}).get(task, {}):
            res["results"][task]["sample_len"] = n
    return res


def _estimate_from_sample(res: dict, plans: dict[str, SamplePlan], order: list, cfg: RunConfig,
                          into: dict, edited: bool = True) -> None:
    """Replace each sampled task's means and standard errors by the stratified estimates over all
    the records of the plan, and record which records were scored and (once records are
    edited) the retention rows."""
    index = {case_id: i for i, case_id in enumerate(order)}
    for task, logged in (res.get("samples") or {}).items():
        if task not in SAMPLED_TASKS or task not in res.get("results", {}):
            continue
        plan = plans[SAMPLED_TASKS[task]]
        positions = [index[doc["doc"]["case_id"]] for doc in logged]
        table = res["results"][task]
        per_metric = {}
        for key in list(table):
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or name == "alias" or not filt:
                continue
            values = {p: doc[name] for p, doc in zip(positions, logged) if isinstance(doc.get(name), (int, float))}
            if not values:
                continue
            mean, stderr = stratified_mean(values, plan)
            table[key], table[f"{name}_stderr,{filt}"] = mean, stderr
            per_metric[name] = values
        into["evaluation_sample"][task] = {
            **plan.to_dict(), "field": SAMPLED_TASKS[task], "estimator": "stratified mean over the edit order",
            "case_ids": [order[p] for p in sorted(positions)]}
        kept = {m: per_metric[m] for m in RETENTION_METRICS if m in per_metric}
        if kept and edited:
            into["retention"][task] = retention(kept, plan, cfg.edit_batch_size)


def _merge_results(into: dict, res: dict) -> None:
    for key, value in res.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        elif key == "samples" and key in into:
            into[key].update(value)
        elif key not in into:
            into[key] = value


def checkpoint_seconds(results: dict, n_records: int) -> tuple[float, float]:
    """(seconds a checkpoint's evaluation took, what a checkpoint scoring every one of ``n_records``
    records would take): a sampled task's seconds scale with the records it scored, the other
    tasks' stay."""
    meta = results["seqedit"]
    sample = meta.get("evaluation_sample") or {}
    took = every = 0.0
    for task, seconds in meta["evaluation_seconds"].items():
        scored = len(sample.get(task, {}).get("case_ids") or ())
        took += seconds
        every += seconds * n_records / scored if scored else seconds
    return took, every


def summarize(results: dict) -> str:
    parts = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias":
                parts.append(f"{task}/{k.split(',')[0]}={v:.3g}")
    return " ".join(parts[:12])
