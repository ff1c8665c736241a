"""Sequential editing runs: edit in batches, evaluate with lm-eval every N edits, resume after a crash.

A run config (YAML; every field is also a command-line flag) names the model, one or more methods,
the edit data, how many edits, the batch size, ``eval_every``, the lm-eval tasks and the output
directory. For each method the model is loaded once; the edit stream goes through the wrapper's
``apply_edits``; before the first edit (the pre-edited point) and after every ``eval_every`` edits
``lm_eval.simple_evaluate`` runs on the same in-memory model.

Output directory::

    manifest.json                   config, versions, git commit, hardware, seed
    <method>/trace.jsonl            one line per edit batch (seconds, preservation loss per layer,
                                    threshold, queue, update norm, target-value loss, RSS)
    <method>/setup.jsonl            one-off seconds of each (re)start: model load, editor prepare
    <method>/hparams.json           the hyper-parameters it edits with, resolved; a resume under
                                    other values is refused
    <method>/checkpoints/edits_000050/results.json   lm-eval's results format (seconds per task
                                    under "seqedit")
    <method>/state/edit_state.pt    edited weights + editor state + RNG states (atomic writes)
    <method>/.lock                  held by the process editing this method (``--only`` splits)

``--resume`` continues from the last saved batch; the final results equal an uninterrupted run's
with the same seed (editing is deterministic and every evaluation is seeded). ``--only`` runs a
subset of the config's methods, so that processes or machines can share one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.editors.hparams import EditHparams
from harness.errors import ConfigError, UserError
from harness.runs.config import RunConfig, build_parser
from harness.runs.environment import git_commit, hardware, memory_mb, versions
from harness.runs.evaluation import checkpoint_seconds, evaluate, summarize, task_manager_for
from harness.runs.resultsdir import HPARAMS_FILE
from harness.runs.runaway import runaway_layers
from harness.runs.storage import (
    atomic_write_text,
    checkpoint_problem,
    json_default,
    load_verified_state,
    method_lock,
    remove_stale_temporaries,
    save_verified_state,
)

log = logging.getLogger("harness.runs.driver")


def count_as_done_before(bar, n: int) -> None:
    """Advance a progress bar over work finished by an earlier process.

    Counted like an update, a resumed run's skipped methods would look like hundreds of edits a
    second and the ETA would be far too short; as part of the bar's starting point they leave the
    rate (and so the ETA) to the edits this process makes.
    """
    if bar.disable or n <= 0:
        return
    bar.n += n
    bar.initial += n
    bar.last_print_n += n
    bar.refresh()


# where the run lives and where caches go do not change its results: a run directory moved or
# copied elsewhere resumes
PLACE_KEYS = ("output_dir", "cache_dir", "offload_folder")
# a permission changes no result either: a run started without it resumes once it is given (the
# manifest then records it), and a run that needs it cannot resume without it (validation)
PERMISSION_KEYS = ("confirm_run_unsafe_code",)
# what a run whose manifest predates a key did: its value there, for the comparison
LEGACY_VALUES = {"eval_sample": None, "fluency_sample": None, "eval_at": [], "device_map": None}


# a free-text description changes no edit
HPARAMS_NOT_COMPARED = ("description",)


# what the pre-edited checkpoint does not depend on: which methods edit afterwards, with which
# hyper-parameters, when they are checkpointed, and where files are kept
PRE_EDIT_INDEPENDENT = ("methods", "hparams", "overrides", "eval_every", "eval_at", "save_every", *PLACE_KEYS,
                        *PERMISSION_KEYS)


def config_differences(recorded: dict, cfg: RunConfig) -> list[str]:
    """The fields in which a run directory's recorded config and ``cfg`` disagree on what is run."""
    new = json.loads(json.dumps(cfg.to_dict()))
    old = {**LEGACY_VALUES, **recorded}
    return sorted(k for k in set(new) | set(old)
                  if k not in PLACE_KEYS + PERMISSION_KEYS and old.get(k) != new.get(k))


def _as_json(hparams: EditHparams) -> dict:
    """Hyper-parameters as their record holds them (tuples as lists), so the two compare equal."""
    return json.loads(json.dumps(hparams.to_dict()))


def hparams_differences(method_dir: Path, method: str, cfg: RunConfig) -> list[str] | None:
    """How the hyper-parameters recorded in ``method_dir`` differ from those ``cfg`` resolves to for
    ``method`` ("key: old -> new"), or None where none are recorded. The manifest names the hparams
    file, not its values: a file edited between two processes (a retuned lambda) would otherwise
    continue the old edit state, and add checkpoints to the old ones, under new values unnoticed."""
    path = method_dir / HPARAMS_FILE
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())["hparams"]
        recorded = {**_as_json(EditHparams()), **recorded}  # a key added since: its default
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is damaged; restore it from a copy, or remove it to adopt this method's "
                          "results under the current hyper-parameters") from None
    current = _as_json(cfg.method_hparams(method))
    return [f"{k}: {json.dumps(recorded.get(k))} -> {json.dumps(current[k])}" for k in sorted(current)
            if k not in HPARAMS_NOT_COMPARED and recorded.get(k) != current[k]]


def run_is_complete(cfg: RunConfig) -> bool:
    """Whether ``cfg.output_dir`` already holds this run, every checkpoint of every method
    finished: read only, so that a sweep can skip a cell without starting a process for it."""
    out = Path(cfg.output_dir).expanduser()
    try:
        recorded = json.loads((out / "manifest.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return False
    if config_differences(recorded, cfg) or any(hparams_differences(out / m, m, cfg) for m in cfg.methods):
        return False  # the run itself says what is wrong
    return all(checkpoint_problem(checkpoint_results_path(out / m, p), m, p) is None
               for m in cfg.methods for p in cfg.checkpoints())


def checkpoint_results_path(method_dir: Path, point: int) -> Path:
    return method_dir / "checkpoints" / f"edits_{point:06d}" / "results.json"


def checkpoint_costs(method_dir: Path, points, n_records: int) -> tuple[float, float] | None:
    """(seconds of an earlier checkpoint, seconds of the last, which scores every one of ``n_records``
    records) as measured by the checkpoints of ``method_dir`` on disk: those after editing began if
    there are any, else the pre-edited one (a sample of the same size); None before any was scored.
    The median, not the mean: one checkpoint that shared the cores with other work (twice as slow)
    would otherwise inflate every estimate after it."""
    measured = {}
    for p in points:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            measured[p] = checkpoint_seconds(json.loads(checkpoint_results_path(method_dir, p).read_text()), n_records)
    after = [x for p, x in measured.items() if p] or list(measured.values())
    if not after:
        return None
    return statistics.median(x for x, _ in after), statistics.median(f for _, f in after)


@dataclass
class MethodPlan:
    """What one method of a run still has to do, read from its directory before a model is loaded."""

    method: str
    directory: Path
    checkpoints: list[int]
    to_compute: dict[int, str]  # checkpoint -> why its results are not on disk ("missing", or the damage)

    @property
    def complete(self) -> bool:
        return not self.to_compute

    @property
    def state_path(self) -> Path:
        return self.directory / "state" / "edit_state.pt"

    @property
    def trace_path(self) -> Path:
        return self.directory / "trace.jsonl"

    def results_path(self, point: int) -> Path:
        return checkpoint_results_path(self.directory, point)


@dataclass
class MethodProgress:
    """One method's model and where its edit stream stands in this process."""

    lm: object
    stream: list
    done: int = 0
    unsaved_batches: int = 0  # batches applied since the edit state was last saved
    forecast_due: bool = True
    prepare_recorded: bool = False
    # this process's editing clock, for the per-batch line written when there is no progress bar
    edit_seconds: float = 0.0
    edits_timed: int = 0
    runaway_warned: set = dataclasses.field(default_factory=set)  # layers already warned about


class SequentialRun:
    """A run in named steps: :meth:`plan` reads what each method still needs; :meth:`load_model`
    and :meth:`restore` bring a method's model to its last saved batch; :meth:`apply_batch` edits
    one batch and traces it; :meth:`save_state` checkpoints the edit state; :meth:`evaluate`
    scores a checkpoint with lm-eval."""

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True,
                 only: list[str] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir).expanduser()
        self.resume = resume
        self.progress = progress
        self.task_manager = None
        # a subset of the config's methods for this process: one run split over several processes
        # or machines shares one config and one output directory, each taking different methods
        unknown = [m for m in only or [] if m not in cfg.methods]
        if unknown:
            raise ConfigError(f"--only {','.join(unknown)}: not among this run's methods ({', '.join(cfg.methods)}); "
                             "--only selects from the config's methods, --methods changes them")
        self.methods = [m for m in cfg.methods if m in (only or cfg.methods)]

    def _check_or_write_manifest(self) -> None:
        path = self.out / "manifest.json"
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
                old = manifest.setdefault("config", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise ConfigError(f"{path} is damaged (not a JSON manifest); restore it from a copy, or remove "
                                  "it to adopt this directory with the current config") from None
            diff = config_differences(old, self.cfg)
            if diff:
                old = {**LEGACY_VALUES, **old}
                was = ", ".join(f"{k}: {json.dumps(old.get(k))}" for k in diff)
                raise ConfigError(
                    f"{self.out} already holds a run with a different config (differs in: {', '.join(diff)}; "
                    f"the run has {was}); refusing to mix them: choose another --output_dir or restore the "
                    "original config")
            if not self.resume:
                raise ConfigError(f"{self.out} already holds this run; add --resume to continue it")
            granted = {k: getattr(self.cfg, k) for k in PERMISSION_KEYS if old.get(k) != getattr(self.cfg, k)}
            if granted:
                old.update(granted)  # the manifest's own config mapping
                atomic_write_text(path, json.dumps(manifest, indent=2, default=json_default))
            return
        manifest = {
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model_name,
            "versions": versions(),
            "git_commit": git_commit(),
            "hardware": hardware(),
            "seed": self.cfg.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        atomic_write_text(path, json.dumps(manifest, indent=2, default=json_default))

    def run(self) -> Path:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out, recursive=False)
        self._check_or_write_manifest()
        total = len(self.methods) * self.cfg.num_edits
        self.bar = tqdm(total=total, desc="sequential run", unit="edit", disable=not self.progress, dynamic_ncols=True)
        for method in self.methods:
            with method_lock(self._method_dir(method)):
                self._check_or_record_hparams(method)
                plan = self.plan(method)
                if plan.complete:
                    # every result is on disk: nothing to redo, even where state/ was not kept (a
                    # run directory committed without its edit states and resumed elsewhere)
                    self.bar.write(f"[{method}] complete: all {len(plan.checkpoints)} checkpoints on disk")
                    count_as_done_before(self.bar, self.cfg.num_edits)
                    continue
                self.run_method(plan)
        self.bar.close()
        return self.out

    def _check_or_record_hparams(self, method: str) -> None:
        """Refuse to continue a method whose recorded hyper-parameters differ from those this config
        resolves to, or record them. Called under the method's lock."""
        mdir = self._method_dir(method)
        changed = hparams_differences(mdir, method, self.cfg)
        if changed is None:
            if any(p.name != ".lock" for p in mdir.iterdir()):
                self.bar.write(f"[{method}] the run predates the record of resolved hyper-parameters: recording "
                               "the current ones, assumed to be those it ran with")
            record = {"method": method, "hparams": _as_json(self.cfg.method_hparams(method))}
            atomic_write_text(mdir / HPARAMS_FILE, json.dumps(record, indent=2))
        elif changed:
            raise ConfigError(
                f"{mdir} was edited with other {method} hyper-parameters than this config resolves to "
                f"({'; '.join(changed)}); refusing to mix them: restore the hyper-parameter file or overrides, "
                "or choose another --output_dir")

    def _method_dir(self, method: str) -> Path:
        return self.out / method

    def _checkpoint_path(self, method: str, point: int) -> Path:
        return checkpoint_results_path(self._method_dir(method), point)

    # -- step 1: plan
    def plan(self, method: str) -> MethodPlan:
        """Which of ``method``'s checkpoints must be computed. Called under the method's lock: the
        half-written files and damaged results that a killed process left are removed here."""
        mdir = self._method_dir(method)
        removed = remove_stale_temporaries(mdir, locked=True)
        if removed:
            self.bar.write(f"[{method}] removed {len(removed)} half-written file(s) a killed process left: "
                           + ", ".join(str(r.relative_to(mdir)) for r in removed))
        plan = MethodPlan(method, mdir, self.cfg.checkpoints(), {})
        for p in plan.checkpoints:
            why = checkpoint_problem(plan.results_path(p), method, p)
            if why is not None and why != "missing":
                self.bar.write(f"[{method}] checkpoint at {p} edits: {why}; recomputing it")
                plan.results_path(p).unlink()
            if why is not None:
                plan.to_compute[p] = why
        return plan

    def run_method(self, plan: MethodPlan) -> None:
        progress = self.restore(plan, self.load_model(plan))
        # the bar counts edits, so its rate and ETA are those of editing: loading a model and
        # scoring a checkpoint (hours, at the end of a long run) are left out of its clock, or one
        # evaluation would read as edits slowed a thousandfold; the forecast line covers them
        self.bar.unpause()
        cfg = self.cfg
        for point in plan.checkpoints:
            if point < progress.done:
                continue  # its results are on disk: restore() starts over when one is not
            while progress.done < point:
                end = min(progress.done + cfg.edit_batch_size, point)
                self.apply_batch(plan, progress, progress.stream[progress.done:end])
            if progress.unsaved_batches:  # the state at every checkpoint is saved (once)
                self.save_state(plan, progress)
            self.evaluate(plan, progress, point)
            self.bar.unpause()

    # -- step 2: a method's model at its last saved batch
    def load_model(self, plan: MethodPlan):
        from lm_eval.api.registry import get_model

        from harness.models import EditingLM

        t0 = time.perf_counter()
        base, _, addon = plan.method.partition("-")
        cls = get_model(f"{base}_hf")
        assert issubclass(cls, EditingLM)
        cfg = self.cfg
        overrides = cfg.overrides_for(plan.method)
        if addon:
            overrides["base"] = addon
        lm = cls(
            pretrained=cfg.model, edit_data=cfg.edit_data, num_edits=0,
            edit_batch_size=cfg.edit_batch_size, hparams=cfg.hparams.get(plan.method),
            seed=cfg.seed, cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device,
            device_map=cfg.device_map, offload_folder=cfg.offload_folder,
            zsre_target=cfg.zsre_target, progress=False, batch_size=cfg.eval_batch_size, **overrides)
        self._record_setup(plan.method, "model_load_seconds", time.perf_counter() - t0)
        return lm

    def restore(self, plan: MethodPlan, lm) -> MethodProgress:
        """Load the newest usable edit state, or start the stream from the seed; the trace on disk is
        made to match what is restored."""
        method = plan.method
        state, state_report = load_verified_state(plan.state_path)
        if state_report:
            self.bar.write(f"[{method}] {state_report}")
        if state is not None:
            saved_edits = len(state["lm"]["edited_case_ids"])
            gaps = [p for p, why in plan.to_compute.items() if p < saved_edits]
            if gaps:
                self.bar.write(f"[{method}] the checkpoint at {gaps[0]} edits must be recomputed and the saved "
                               f"state is at {saved_edits} edits: editing again from the start (the checkpoints "
                               "on disk are kept)")
                state = None
        if state is not None:
            lm.load_edit_state(state["lm"])
            _set_rng_state(state["rng"])
            self._restore_trace(plan.trace_path, lm.trace, method)
            log.info("%s: resumed after %d edits", method, lm.num_edited)
        else:
            plan.trace_path.unlink(missing_ok=True)
            _seed_everything(self.cfg.seed)
        count_as_done_before(self.bar, lm.num_edited)
        stream = lm.stream[: self.cfg.num_edits]
        lm.check_prompt_lengths(stream[lm.num_edited:])
        return MethodProgress(lm=lm, stream=stream, done=lm.num_edited)

    # -- step 3: one batch
    def apply_batch(self, plan: MethodPlan, progress: MethodProgress, batch: list) -> dict:
        """Edit one batch, append its line to the trace (flushed to disk before anything else), and
        save the edit state every ``save_every`` batches."""
        lm = progress.lm
        (record,) = lm.apply_edits(batch, batch_size=len(batch))
        progress.done += len(batch)
        record = {**record, **memory_mb()}
        if not progress.prepare_recorded and getattr(lm.editor, "prepare_seconds", None) is not None:
            # context templates, key statistics (computed or read from the cache), projectors
            self._record_setup(plan.method, "prepare_seconds", lm.editor.prepare_seconds)
            progress.prepare_recorded = True
        if progress.forecast_due:
            progress.forecast_due = False
            self.bar.write(f"[{plan.method}] " + self._forecast(plan.method, record))
        with open(plan.trace_path, "a") as fh:
            fh.write(json.dumps(record, default=json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        progress.unsaved_batches += 1
        self.bar.update(record["batch_size"])
        if not self.progress:
            self.bar.write(self._batch_line(plan.method, progress, record))
        self.warn_runaway(plan.method, progress)
        if progress.unsaved_batches >= self.cfg.save_every:
            self.save_state(plan, progress)
        return record

    # -- step 4: the edit state
    def save_state(self, plan: MethodPlan, progress: MethodProgress) -> None:
        save_verified_state({"lm": progress.lm.edit_state(), "rng": _get_rng_state()}, plan.state_path)
        progress.unsaved_batches = 0

    # -- step 5: a checkpoint's evaluation
    def evaluate(self, plan: MethodPlan, progress: MethodProgress, point: int) -> None:
        method, lm = plan.method, progress.lm
        path = plan.results_path(point)
        if path.exists():
            return
        if point == 0 and self._copy_pre_edited(method, path):
            return
        if self.task_manager is None:
            self.task_manager = task_manager_for(self.cfg)
        partial_dir = path.parent / "partial"
        results = evaluate(lm, self.cfg, self.task_manager, final=point == self.cfg.num_edits,
                           partial_dir=partial_dir)
        samples = results.pop("samples", None)
        results["seqedit"] = {"method": method, "num_edits": point, "model_name": self.cfg.model_name,
                              "edited_case_ids": [r.case_id for r in lm.edited_requests],
                              "evaluation_seconds": results.pop("evaluation_seconds"),
                              **results.pop("seqedit")}
        if samples is not None:
            atomic_write_text(path.with_name("samples.json"), json.dumps(samples, default=json_default))
        atomic_write_text(path, json.dumps(results, indent=2, default=json_default))
        shutil.rmtree(partial_dir, ignore_errors=True)
        self.bar.write(f"[{method} @ {point} edits] " + summarize(results))

    # -- what the steps share
    def warn_runaway(self, method: str, progress: MethodProgress) -> None:
        """Say once per layer when its per-batch update starts growing geometrically: hours before
        a checkpoint would show the model breaking."""
        for runaway in runaway_layers(progress.lm.trace):
            if runaway.layer not in progress.runaway_warned:
                progress.runaway_warned.add(runaway.layer)
                self.bar.write(f"[{method}] warning: {runaway.describe()}")

    def _batch_line(self, method: str, progress: MethodProgress, record: dict) -> str:
        """One line per batch where no bar is drawn (a sweep cell writes to a log file): edits done,
        this batch's seconds and the editing left at this process's mean rate."""
        progress.edit_seconds += record["edit_seconds"]
        progress.edits_timed += record["batch_size"]
        later = self.methods[self.methods.index(method) + 1:]
        edits_left = self.cfg.num_edits - progress.done + self.cfg.num_edits * len(later)
        left_h = edits_left * progress.edit_seconds / progress.edits_timed / 3600
        return (f"[{method}] {progress.done:,}/{self.cfg.num_edits:,} edits; batch {record['edit_seconds']:.0f} s; "
                f"editing left about {left_h:.1f} h{' (this method and the later ones)' if later else ''}, "
                "checkpoints not counted")

    def _forecast(self, method: str, first_batch: dict) -> str:
        """What is left of this process's work, in hours, from this batch's seconds per edit and the
        evaluation seconds of the checkpoints on disk (the pre-edited one if none later)."""
        cfg = self.cfg
        rate = first_batch["edit_seconds"] / max(1, first_batch["batch_size"])
        later = self.methods[self.methods.index(method) + 1:]
        edits_left = cfg.num_edits - first_batch["edits_done"] + cfg.num_edits * len(later)
        costs = checkpoint_costs(self._method_dir(method), cfg.checkpoints(), cfg.num_edits)
        # the later methods copy this one's pre-edited checkpoint (_copy_pre_edited), so only their
        # checkpoints after an edit cost evaluation
        points_left = (sum(1 for p in cfg.checkpoints() if p >= first_batch["edits_done"]
                           and not self._checkpoint_path(method, p).exists())
                       + sum(1 for p in cfg.checkpoints() if p) * len(later))
        finals_left = int(not self._checkpoint_path(method, cfg.num_edits).exists()) + len(later)
        editing_h = edits_left * rate / 3600
        text = f"forecast: {edits_left:,} edits left at {rate:.2f} s/edit = {editing_h:.1f} h of editing"
        total_h = editing_h
        if costs:
            per_checkpoint, final = costs
            eval_h = ((points_left - finals_left) * per_checkpoint + finals_left * final) / 3600
            total_h += eval_h
            parts = []
            # "earlier", not "sampled": with eval_sample null every checkpoint scores every record
            earlier_left = points_left - finals_left
            if earlier_left:
                parts.append(f"{earlier_left} earlier checkpoint{'s' if earlier_left != 1 else ''} "
                             f"at about {per_checkpoint / 60:.0f} min")
            if finals_left:
                parts.append(f"the last{' of each method' if later else ''} (every one of {cfg.num_edits:,} "
                             f"edited records) about {final / 60:.0f} min")
            text += "; " + (" and ".join(parts) or "no checkpoints") + f" = {eval_h:.1f} h of evaluation"
        finish = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + total_h * 3600))
        return text + f"; done about {finish} if nothing else runs (the bar's ETA counts editing only)"

    def _record_setup(self, method: str, name: str, value: float) -> None:
        """One-off costs of each (re)start of a method, appended to ``<method>/setup.jsonl``."""
        path = self._method_dir(method) / "setup.jsonl"
        with open(path, "a") as fh:
            fh.write(json.dumps({name: value, "time": time.time()}) + "\n")

    def _restore_trace(self, path: Path, saved: list[dict], method: str) -> None:
        """Make trace.jsonl hold exactly the saved state's batches: lines after it (written before a
        crash) are dropped, a line cut by the crash too, and lines missing from the file are
        restored from the copy the state keeps (without the memory figures of the live run)."""
        on_disk = {}
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("batch"), int):
                    on_disk.setdefault(record["batch"], record)
        kept, restored = [], 0
        for record in saved:
            if record["batch"] in on_disk:
                kept.append(on_disk[record["batch"]])
            else:
                kept.append(record)
                restored += 1
        if restored:
            self.bar.write(f"[{method}] trace.jsonl lacked {restored} of {len(saved)} batches: restored from the "
                           "saved state")
        atomic_write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in kept))

    def _copy_pre_edited(self, method: str, path: Path) -> bool:
        """Before its first edit every method holds the same untouched model and is scored with the
        same seeds, so the pre-edited checkpoint is evaluated once and copied: from the run's other
        methods, or from a sibling run directory (another cell of a sweep) whose config differs only
        in what happens after the first edit. For a long run of many methods, or a sweep over
        methods, a large share of the scoring time."""
        for source_name, source in self._pre_edited_sources(method):
            results = json.loads(source.read_text())
            results["seqedit"] = {**results["seqedit"], "method": method, "pre_edited_from": source_name}
            if source.with_name("samples.json").exists():
                atomic_write_text(path.with_name("samples.json"), source.with_name("samples.json").read_text())
            atomic_write_text(path, json.dumps(results, indent=2, default=json_default))
            self.bar.write(f"[{method} @ 0 edits] the pre-edited model's results, as evaluated for {source_name}")
            return True
        return False

    def _pre_edited_sources(self, method: str):
        """(name, path) of finished pre-edited checkpoints that hold for ``method`` of this run."""
        for other in self.cfg.methods:
            source = self._checkpoint_path(other, 0)
            if other != method and checkpoint_problem(source, other, 0) is None:
                yield other, source
        mine = {k: v for k, v in json.loads(json.dumps(self.cfg.to_dict())).items() if k not in PRE_EDIT_INDEPENDENT}
        for manifest in sorted(self.out.parent.glob("*/manifest.json")):
            sibling = manifest.parent
            if sibling.resolve() == self.out.resolve():
                continue
            try:
                config = {**LEGACY_VALUES, **json.loads(manifest.read_text())["config"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if any(config.get(k) != v for k, v in mine.items()):
                continue
            for other in config.get("methods") or []:
                source = checkpoint_results_path(sibling / other, 0)
                if checkpoint_problem(source, other, 0) is None:
                    yield f"{sibling.name}/{other}", source


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _get_rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    from harness.editors.guard import NonFiniteUpdateError

    cfg = None
    try:
        cfg = RunConfig.from_sources(args.config, cli)
        out = SequentialRun(cfg, resume=args.resume, progress=not args.no_progress, only=args.only).run()
    except UserError as exc:
        if args.debug:
            raise
        print(f"seqedit run: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteUpdateError as exc:
        if args.debug:
            raise
        print(f"seqedit run: error: {exc} The run directory {cfg.output_dir} keeps every checkpoint "
              "and the edit state of the last good batch: --resume continues from there (a transient "
              "fault); other hyper-parameters need another --output_dir.", file=sys.stderr)
        return 2
    print(f"run complete: {out}")
    return 0
