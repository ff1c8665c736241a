"""Reading the run directories written by the sequential driver.

A run directory holds ``manifest.json`` (the run's config, model, versions) and one directory
per editing method with ``trace.jsonl`` (one object per edit batch) and
``checkpoints/edits_NNNNNN/results.json`` (lm-eval's results JSON after NNNNNN edits; NNNNNN = 0
is the pre-edited model). Everything that knows this layout or lm-eval's ``"<metric>,<filter>"``
key convention lives here, so the leaderboard and the report read the same numbers.

Editing metrics are found in any results entry whose task name starts with the dataset's task
prefix (``counterfact_edit``, ``zsre_edit``); every other entry is general capability. A metric a
checkpoint does not report is absent, never zero.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from harness.tasks.notes import UNAVAILABLE_NOTE

MANIFEST_FILE = "manifest.json"
TRACE_FILE = "trace.jsonl"
CHECKPOINTS_DIR = "checkpoints"
RESULTS_FILE = "results.json"
HPARAMS_FILE = "hparams.json"  # a method's resolved hyper-parameters (the driver writes it)
CHECKPOINT_PATTERN = re.compile(r"^edits_(\d+)$")

STDERR_SUFFIX = "_stderr"
DEFAULT_FILTER = "none"


class RunDirError(UserError, ValueError):
    """A path is not a readable run directory, or a file in it is malformed."""


@dataclass(frozen=True)
class Measurement:
    mean: float  # NaN/Inf where the results file says so: a numerical fault, shown as such
    stderr: float | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.mean)


@dataclass(frozen=True)
class EditingDataset:
    name: str  # as in the run config's edit_data: "counterfact" | "zsre"
    title: str
    task_prefix: str


COUNTERFACT = EditingDataset("counterfact", "CounterFact", "counterfact_edit")
ZSRE = EditingDataset("zsre", "ZsRE", "zsre_edit")
EDITING_DATASETS = (COUNTERFACT, ZSRE)


@dataclass(frozen=True)
class EditingMetric:
    dataset: EditingDataset
    name: str  # lm-eval metric name, before the ",<filter>"
    label: str  # column header of the LyapLock paper's Table 1
    axis_label: str  # with units, for plots
    meaning: str
    # a limit of the metric a reader must know; said in its definition and in the caption of the
    # figure that draws it
    caveat: str | None = None
    # read from the driver's retention rows ("first_batch" -> this metric) instead of lm-eval's
    retention_of: str | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset.name}/{self.name}"

    @property
    def definition(self) -> str:
        return f"{self.meaning}; {self.caveat}" if self.caveat else self.meaning

    @property
    def title(self) -> str:
        return f"{self.dataset.title} {self.name}"


# Table 1 of the LyapLock paper, in its column order; all are x100 and higher is better.
EDITING_METRICS = (
    EditingMetric(COUNTERFACT, "efficacy", "Eff.", "efficacy (% of edits)",
                  "% of edited prompts where the new object beats the true one"),
    EditingMetric(COUNTERFACT, "generalization", "Gen.", "generalization (% of paraphrases)",
                  "same test on paraphrases of the edited prompt"),
    EditingMetric(COUNTERFACT, "specificity", "Spe.", "specificity (% of neighbours)",
                  "% of neighbourhood prompts where the true object still wins"),
    EditingMetric(COUNTERFACT, "fluency", "Flu.", "fluency (n-gram entropy x100)",
                  "weighted 2-/3-gram entropy of generated text, x100",
                  caveat="it falls when text repeats itself, not when it loses its sense, "
                  "so read it beside perplexity"),
    EditingMetric(COUNTERFACT, "consistency", "Consis.", "consistency (TF-IDF cosine x100)",
                  "TF-IDF similarity of generated text to reference text about the new object, x100"),
    EditingMetric(ZSRE, "efficacy", "Eff.", "efficacy (% of target tokens)",
                  "token-level top-1 accuracy of the new answer on the edited question"),
    EditingMetric(ZSRE, "generalization", "Gen.", "generalization (% of target tokens)",
                  "same accuracy on the rephrased question"),
    EditingMetric(ZSRE, "specificity", "Spe.", "specificity (% of target tokens)",
                  "token-level accuracy of the true answer on unrelated NQ questions"),
)

# the retention column family: the records of the first batch, after every later edit
EDITING_METRICS += tuple(
    EditingMetric(dataset, f"first_batch_{name}", f"{label} 1st batch", f"{name} of the first batch",
                  f"{name} on the records edited in the first batch, measured after all later edits",
                  retention_of=name)
    for dataset in (COUNTERFACT, ZSRE) for name, label in (("efficacy", "Eff."), ("generalization", "Gen."))
)

EDITING_METRIC_BY_KEY = {spec.key: spec for spec in EDITING_METRICS}


@dataclass(frozen=True)
class GeneralMetric:
    """One (task, lm-eval metric key) of a general-capability task."""

    task: str
    metric_key: str  # "<metric>,<filter>" exactly as lm-eval writes it

    @property
    def metric(self) -> str:
        return self.metric_key.split(",", 1)[0]

    @property
    def label(self) -> str:
        name, _, filt = self.metric_key.partition(",")
        return name if filt in ("", DEFAULT_FILTER) else f"{name} [{filt}]"


# the general-capability measure a small model shows best: (task, lm-eval metric key)
PERPLEXITY = ("wikitext_edit", "word_perplexity,none")

# groups whose subtasks also show one metric of their own: edit_glue's pooled accuracy mixes the one
# subset a small model scores above chance (SST-2) with five at chance
PER_SUBTASK_METRICS = {"edit_glue": "acc_likelihood,none"}


@dataclass
class Checkpoint:
    edits: int
    path: Path
    results: dict

    def task_metrics(self) -> dict[str, dict]:
        return self.results.get("results") or {}

    def group_names(self) -> set[str]:
        subtasks = self.results.get("group_subtasks") or {}
        return {name for name, children in subtasks.items() if children}

    def editing(self) -> dict[str, Measurement]:
        """Editing metrics by ``EditingMetric.key``, where this checkpoint reports them."""
        tasks = self.task_metrics()
        groups = self.group_names()
        retention = self.retention()
        found = {}
        for spec in EDITING_METRICS:
            if spec.retention_of:
                row = retention.get(spec.dataset.name, {}).get("first_batch") or {}
                value = _number(row.get(spec.retention_of))
                if value is not None:
                    found[spec.key] = Measurement(value, _number(row.get(f"{spec.retention_of}_stderr")))
                continue
            names = [t for t in tasks if t.startswith(spec.dataset.task_prefix)]
            # a group may repeat its subtask's number as an aggregate: the subtask is the source
            names.sort(key=lambda t: t in groups)
            for task in names:
                value = _measurement(tasks[task], spec.name)
                if value is not None:
                    found[spec.key] = value
                    break
        return found

    def unavailable(self) -> dict[str, str]:
        """Why editing metrics are missing, by ``EditingMetric.key``, where the task said so."""
        configs = self.results.get("configs") or {}
        found = {}
        for spec in EDITING_METRICS:
            for task, config in configs.items():
                if not task.startswith(spec.dataset.task_prefix):
                    continue
                note = ((config or {}).get("metadata") or {}).get(spec.name)
                if isinstance(note, str) and note.startswith(UNAVAILABLE_NOTE):
                    found[spec.key] = note[len(UNAVAILABLE_NOTE):]
        return found

    def general(self) -> dict[GeneralMetric, Measurement]:
        """Every numeric metric of the non-editing tasks.

        A task inside a group that reports its own aggregate is represented by that group only,
        so a 57-subject MMLU shows up as one column set, not 57.
        """
        tasks = self.task_metrics()
        subtasks = self.results.get("group_subtasks") or {}
        editing_prefixes = tuple(d.task_prefix for d in EDITING_DATASETS)
        general_tasks = [t for t in tasks if not t.startswith(editing_prefixes)]
        reporting = {t for t in general_tasks if _metric_keys(tasks[t])}
        hidden = set()
        for group in reporting:
            hidden |= _descendants(group, subtasks)
        found = {}
        for task in sorted(reporting - hidden):
            for key in _metric_keys(tasks[task]):
                value = _measurement_by_key(tasks[task], key)
                if value is not None:
                    found[GeneralMetric(task, key)] = value
        for group, key in PER_SUBTASK_METRICS.items():
            for task in sorted(_descendants(group, subtasks) & set(general_tasks)):
                value = _measurement_by_key(tasks[task], key)
                if value is not None:
                    found[GeneralMetric(task, key)] = value
        return found

    def measurement(self, task: str, key: str) -> Measurement | None:
        """One ``"<metric>,<filter>"`` of one task (a group's subtask too), as the file holds it."""
        return _measurement_by_key(self.task_metrics().get(task) or {}, key)

    def chance_level(self, task: str) -> float | None:
        """1 / the number of answer choices of a multiple-choice task (the bundled edit_glue subsets
        are class-balanced, so this is also the majority rate), where its config lists them."""
        choices = ((self.results.get("configs") or {}).get(task) or {}).get("doc_to_choice")
        return 1.0 / len(choices) if isinstance(choices, list) and choices else None

    def retention(self) -> dict[str, dict[str, dict]]:
        """The retention rows the driver wrote (``harness.runs.sampling.retention``), by editing
        dataset name: ``{stratum: {"edits_since", "scored", "efficacy", ...}}``."""
        rows = (self.results.get("seqedit") or {}).get("retention") or {}
        found = {}
        for dataset in EDITING_DATASETS:
            for task, strata in sorted(rows.items()):
                if task.startswith(dataset.task_prefix) and isinstance(strata, dict) and strata:
                    found.setdefault(dataset.name, strata)
        return found

    def higher_is_better(self, metric: GeneralMetric) -> bool | None:
        return (self.results.get("higher_is_better") or {}).get(metric.task, {}).get(metric.metric)


@dataclass
class MethodRun:
    """One method's directory inside a run directory."""

    method: str
    path: Path
    run_path: Path
    model: str
    edit_data: str
    trace: list[dict]
    checkpoints: dict[int, Checkpoint]  # by number of edits, ascending
    config: dict = field(default_factory=dict)  # the run's config (manifest)
    seeds: list = field(default_factory=list)  # where this row averages runs that differ only in seed

    @property
    def dataset(self) -> str | None:
        return dataset_of(self.edit_data)

    def editing_at(self, edits: int) -> dict[str, Measurement]:
        """Editing metrics after ``edits`` edits that describe edits of their own dataset.

        A ZsRE task run inside a CounterFact run scores CounterFact records, so its numbers are
        not ZsRE editing results; a run whose edit data is not recognisable keeps everything.
        """
        found = self.checkpoints[edits].editing() if edits in self.checkpoints else {}
        return {
            key: value for key, value in found.items()
            if self.dataset in (EDITING_METRIC_BY_KEY[key].dataset.name, None)
        }

    def retention_at(self, edits: int) -> dict[str, dict]:
        """Retention rows of this run's own editing dataset after ``edits`` edits ({} if none)."""
        found = self.checkpoints[edits].retention() if edits in self.checkpoints else {}
        if self.dataset is None:
            return next(iter(found.values()), {})
        return found.get(self.dataset, {})

    def general_at(self, edits: int) -> dict[GeneralMetric, Measurement]:
        return self.checkpoints[edits].general() if edits in self.checkpoints else {}

    def layer_series(self, field_name: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{layer: (edits_done, values)}`` of one per-layer trace field, layers in numeric order."""
        series: dict[str, tuple[list[int], list[float]]] = {}
        for batch in self.trace:
            for layer, values in _layers(batch).items():
                value = _number(values.get(field_name))
                if value is not None and "edits_done" in batch:
                    xs, ys = series.setdefault(layer, ([], []))
                    xs.append(int(batch["edits_done"]))
                    ys.append(value)
        return dict(sorted(series.items(), key=lambda kv: _layer_order(kv[0])))

    def batch_series(self, field_name: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for batch in self.trace:
            value = _number(batch.get(field_name))
            if value is not None and "edits_done" in batch:
                xs.append(int(batch["edits_done"]))
                ys.append(value)
        return xs, ys


@dataclass
class RunDir:
    path: Path
    manifest: dict
    methods: list[MethodRun]
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def model(self) -> str:
        return model_name(self.manifest)

    @property
    def name(self) -> str:
        return self.path.name


# what a run directory's results are, as opposed to its working files (edit states, a checkpoint's
# partial evaluation, locks, half-written temporaries): the files worth committing or sharing
RESULT_FILES = (MANIFEST_FILE, f"*/{TRACE_FILE}", f"*/{HPARAMS_FILE}", "*/setup.jsonl", f"*/{CHECKPOINTS_DIR}/edits_*/{RESULTS_FILE}",
                f"*/{CHECKPOINTS_DIR}/edits_*/samples.json")


def export_results(source: Path, dest: Path) -> list[Path]:
    """Copy the results of run directory ``source`` into ``dest`` (created or updated), without
    its edit states or any other working file; for a sweep directory, those of every cell and the
    cells' configs. Returns the files written."""
    source, dest = Path(source).expanduser(), Path(dest).expanduser()
    if not (source / MANIFEST_FILE).is_file():
        cells = sorted(p.parent for p in source.glob(f"*/{MANIFEST_FILE}")) if source.is_dir() else []
        if not cells:
            raise RunDirError(f"{source} is neither a run directory nor a sweep directory (no {MANIFEST_FILE} "
                              "in it or in its subdirectories)")
        written = _copy_matching(source, dest, ("configs/*.yaml",))
        for cell in cells:
            written += export_results(cell, dest / cell.name)
        return written
    return _copy_matching(source, dest, RESULT_FILES)


def _copy_matching(source: Path, dest: Path, patterns) -> list[Path]:
    import shutil

    written = []
    for pattern in patterns:
        for path in sorted(source.glob(pattern)):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".export-tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(target)
            written.append(target)
    return written


def export_main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="seqedit export",
        description="Copy a run directory's results (manifest, traces, checkpoints) without its edit states, "
                    "e.g. from a run outside the checkout into leaderboards/runs/; a sweep directory's "
                    "for every cell.")
    parser.add_argument("run", type=Path, metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("dest", type=Path, metavar="DEST")
    args = parser.parse_args(argv)
    written = export_results(args.run, args.dest)
    print(f"exported {len(written)} files from {args.run} to {args.dest}")
    return 0


def model_name(manifest: dict) -> str:
    config = manifest.get("config") or {}
    return str(manifest.get("model_name") or config.get("model") or "unknown model")


def dataset_of(edit_data: str | None) -> str | None:
    """Which editing dataset an ``edit_data`` spec (a name or a path) holds, if recognisable."""
    if not edit_data:
        return None
    base = os.path.basename(str(edit_data)).lower()
    if "zsre" in base:
        return ZSRE.name
    if "counterfact" in base or base.startswith("mcf"):
        return COUNTERFACT.name
    return None


def load_runs(paths) -> list[RunDir]:
    """Read run directories; a path without a manifest is searched one level down for runs."""
    runs = []
    for raw in paths:
        path = Path(raw)
        if (path / MANIFEST_FILE).is_file():
            runs.append(load_run(path))
            continue
        children = sorted(p.parent for p in path.glob(f"*/{MANIFEST_FILE}")) if path.is_dir() else []
        if not children:
            raise RunDirError(
                f"{path} is not a run directory: no {MANIFEST_FILE} in it or in its subdirectories. "
                "Pass the output directory the sequential driver wrote."
            )
        runs.extend(load_run(child) for child in children)
    return runs


def load_run(path: Path) -> RunDir:
    path = Path(path)
    manifest = _read_json(path / MANIFEST_FILE)
    if not isinstance(manifest, dict):
        raise RunDirError(f"{path / MANIFEST_FILE}: expected a JSON object")
    config = manifest.get("config") or {}
    declared = [str(m) for m in config.get("methods") or []]
    on_disk = sorted(
        p.name for p in path.iterdir()
        if p.is_dir() and ((p / TRACE_FILE).is_file() or (p / CHECKPOINTS_DIR).is_dir())
    )
    run = RunDir(path=path, manifest=manifest, methods=[])
    for method in declared + [m for m in on_disk if m not in declared]:
        method_path = path / method
        if method not in on_disk:
            run.notes.append(f"{path.name}: method {method} has no results yet (no {method}/ directory)")
            continue
        run.methods.append(MethodRun(
            method=method,
            path=method_path,
            run_path=path,
            model=run.model,
            edit_data=str(config.get("edit_data") or ""),
            trace=read_trace(method_path / TRACE_FILE),
            checkpoints=read_checkpoints(method_path / CHECKPOINTS_DIR),
            config=config,
        ))
    return run


# config fields that say where a run lives or which seed it drew, not what it is
NOT_A_SETTING = ("seed", "output_dir", "cache_dir")


def combine_seeds(method_runs: list[MethodRun]) -> list[MethodRun]:
    """Runs of one method that differ only in their seed (the cells of a sweep over seeds) become
    one run whose every metric is the mean over the seeds, with the standard error across seeds,
    at the checkpoints they all reached. Other runs are returned as they are."""
    groups: dict[str, list[MethodRun]] = {}
    for m in method_runs:
        setting = {k: v for k, v in m.config.items() if k not in NOT_A_SETTING}
        key = json.dumps([m.model, m.method, setting], sort_keys=True, default=str)
        groups.setdefault(key, []).append(m)
    combined = []
    for members in groups.values():
        seeds = [m.config.get("seed") for m in members]
        if len(members) < 2 or len(set(map(str, seeds))) < len(members) or not members[0].config:
            combined.extend(members)
            continue
        points = sorted(set.intersection(*(set(m.checkpoints) for m in members)))
        first = members[0]
        combined.append(MethodRun(
            method=first.method, path=first.path, run_path=first.run_path.parent / (
                f"{first.run_path.name} (mean of {len(members)} seeds)"),
            model=first.model, edit_data=first.edit_data, trace=first.trace,
            checkpoints={p: _mean_checkpoint(p, [m.checkpoints[p] for m in members]) for p in points},
            config=first.config, seeds=seeds))
    return combined


def _mean_checkpoint(edits: int, parts: list[Checkpoint]) -> Checkpoint:
    """A checkpoint whose numbers are the means over ``parts`` (one per seed); each metric's
    standard error is the spread across the seeds."""
    results = json.loads(json.dumps(parts[0].results))
    tables = [p.task_metrics() for p in parts]
    for task, metrics in results.get("results", {}).items():
        for key in list(metrics):
            name, sep, filt = key.partition(",")
            if not sep or name.endswith(STDERR_SUFFIX):
                continue
            values = [_number((t.get(task) or {}).get(key)) for t in tables]
            if any(v is None for v in values):
                continue
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            metrics[key] = mean
            metrics[f"{name}{STDERR_SUFFIX},{filt}"] = spread / math.sqrt(len(values))
    rows = [(p.results.get("seqedit") or {}).get("retention") or {} for p in parts]
    for task, strata in ((results.get("seqedit") or {}).get("retention") or {}).items():
        for stratum, row in strata.items():
            for field_name, value in list(row.items()):
                values = [_number(((r.get(task) or {}).get(stratum) or {}).get(field_name)) for r in rows]
                if _number(value) is not None and all(v is not None for v in values):
                    row[field_name] = sum(values) / len(values)
    return Checkpoint(edits, parts[0].path, results)


def read_trace(path: Path) -> list[dict]:
    """The per-batch trace, one entry per batch (the last one written wins after a resume)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    batches: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                # a run killed mid-write leaves a truncated last line; the rest is still valid
                warnings.warn(f"{path}:{number}: ignoring truncated last line ({err})", stacklevel=2)
                continue
            raise RunDirError(f"{path}:{number}: not valid JSON ({err})") from err
        key = entry.get("batch", len(batches))
        batches.pop(key, None)
        batches[key] = entry
    return sorted(batches.values(), key=lambda b: (b.get("edits_done", 0), b.get("batch", 0)))


def read_checkpoints(path: Path) -> dict[int, Checkpoint]:
    """Evaluated checkpoints by number of edits; a checkpoint without results yet is skipped."""
    checkpoints = {}
    if not path.is_dir():
        return checkpoints
    for child in path.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        results_path = child / RESULTS_FILE
        if match and results_path.is_file():
            edits = int(match.group(1))
            results = _read_json(results_path)
            if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
                raise RunDirError(
                    f"{results_path}: not an lm-eval results JSON (no \"results\" object)"
                )
            checkpoints[edits] = Checkpoint(edits=edits, path=results_path, results=results)
    return dict(sorted(checkpoints.items()))


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RunDirError(f"{path}: missing") from err
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from err


def _number(value) -> float | None:
    """A finite float, or None for "N/A", null, NaN and non-numbers (unavailable is not zero)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_keys(task_metrics: dict) -> list[str]:
    """The ``"<metric>,<filter>"`` keys holding values (not stderrs, not the alias); a NaN is a
    value (a fault to show), "N/A" and null are not (unavailable)."""
    keys = []
    for key, value in task_metrics.items():
        name, sep, _ = key.partition(",")
        if sep and not name.endswith(STDERR_SUFFIX) and _is_number(value):
            keys.append(key)
    return keys


def _measurement_by_key(task_metrics: dict, key: str) -> Measurement | None:
    value = task_metrics.get(key)
    if not _is_number(value):
        return None
    mean = float(value)
    name, _, filt = key.partition(",")
    return Measurement(mean, _number(task_metrics.get(f"{name}{STDERR_SUFFIX},{filt}")))


def _measurement(task_metrics: dict, metric: str) -> Measurement | None:
    """A metric under lm-eval's default filter if present, otherwise under any filter."""
    keys = [k for k in _metric_keys(task_metrics) if k.partition(",")[0] == metric]
    keys.sort(key=lambda k: k.partition(",")[2] != DEFAULT_FILTER)
    for key in keys:
        value = _measurement_by_key(task_metrics, key)
        if value is not None:
            return value
    return None


def _descendants(group: str, subtasks: dict[str, list[str]]) -> set[str]:
    found, stack = set(), list(subtasks.get(group) or [])
    while stack:
        child = stack.pop()
        if child not in found:
            found.add(child)
            stack.extend(subtasks.get(child) or [])
    return found


def _layers(batch: dict) -> dict[str, dict]:
    layers = batch.get("layers") or {}
    return {str(k): v for k, v in layers.items() if isinstance(v, dict)}


def _layer_order(layer: str):
    return (0, int(layer), "") if layer.lstrip("-").isdigit() else (1, 0, layer)
