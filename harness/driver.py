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
    <method>/checkpoints/edits_000050/results.json   lm-eval's results format (seconds per task
                                    under "seqedit")
    <method>/state/edit_state.pt    edited weights + editor state + RNG states (atomic writes)
    <method>/.lock                  held by the process editing this method (``--only`` splits)

``--resume`` continues from the last saved batch; the final results equal an uninterrupted run's
with the same seed (editing is deterministic and every evaluation is seeded). ``--only`` runs a
subset of the config's methods, so that processes or machines can share one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.errors import ConfigError, UserError, did_you_mean, unknown_names_error, whole_number
from harness.sampling import RETENTION_METRICS, SamplePlan, plan_sample, retention, stratified_mean

log = logging.getLogger("harness.driver")

EDITING_TASK_PREFIXES = ("counterfact_edit", "zsre_edit")
ALL_METHODS = "*"  # key of ``overrides`` that applies to every method


@dataclass
class RunConfig:
    model: str | None = None  # pretrained: hub id, directory, .gguf file; None = embedded SmolLM2
    model_name: str = "SmolLM2-135M-Instruct"
    methods: list[str] = field(default_factory=lambda: ["memit", "lyaplock"])
    edit_data: str = "counterfact"
    num_edits: int = 20
    edit_batch_size: int = 10
    eval_every: int = 10
    eval_at: list[int] = field(default_factory=list)  # checkpoints besides every eval_every edits
    tasks: list[str] = field(default_factory=lambda: ["counterfact_edit"])
    limit: int | None = None  # per general-capability task; editing tasks are sized by eval_sample
    # records an editing task scores at a checkpoint (None: all); the last checkpoint scores all
    eval_sample: int | None = 500
    fluency_sample: int | None = 100
    num_fewshot: int | None = None
    eval_batch_size: int = 8
    task_metadata: dict = field(default_factory=dict)
    confirm_run_unsafe_code: bool = False
    log_samples: bool = False
    hparams: dict = field(default_factory=dict)  # method -> hparams name/path
    overrides: dict = field(default_factory=dict)  # method -> {hparam: value}
    output_dir: str = "runs/demo"
    seed: int = 0
    save_every: int = 1  # batches between saved edit states
    dtype: str = "float32"
    device: str | None = None
    cache_dir: str | None = None
    zsre_target: str = "answers"

    @classmethod
    def from_sources(cls, path: str | None, cli: dict) -> RunConfig:
        data = {}
        if path:
            try:
                with open(path) as fh:
                    data = yaml.safe_load(fh) or {}
            except OSError as exc:
                raise ConfigError(f"--config {path}: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
            if not isinstance(data, dict):
                raise ConfigError(f"--config {path}: expected a mapping of run-config keys, got {type(data).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - valid
        if unknown:
            raise unknown_names_error(f"run-config key(s) in {path}:", unknown, valid)
        data.update({k: v for k, v in cli.items() if v is not None})
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every mistake that can be seen without a model, each as one line naming the fix: checked
        before anything is loaded or written."""
        for name, minimum in (("num_edits", 0), ("seed", 0), ("edit_batch_size", 1), ("eval_every", 1),
                              ("eval_batch_size", 1), ("save_every", 1)):
            setattr(self, name, whole_number(name, getattr(self, name), minimum))
        self.limit = whole_number("limit", self.limit, minimum=1, allow_none=True)
        for name in ("eval_sample", "fluency_sample"):
            value = getattr(self, name)
            value = None if isinstance(value, str) and value.strip().lower() in ("all", "null", "none") else value
            setattr(self, name, whole_number(name, value, minimum=1, allow_none=True))
        if self.eval_sample is not None and self.eval_sample <= self.edit_batch_size < self.num_edits:
            raise ConfigError(
                f"eval_sample ({self.eval_sample}) must exceed edit_batch_size ({self.edit_batch_size}): a "
                "checkpoint scores the whole first batch and a share of every later tenth of the edits; "
                "raise eval_sample, or set it to null to score every edited record")
        if not isinstance(self.eval_at, list):
            raise ConfigError(f"eval_at must be a list of edit counts, got {self.eval_at!r}")
        self.eval_at = [whole_number("eval_at", x, 1) for x in self.eval_at]
        off = [x for x in self.eval_at if x % self.edit_batch_size or x > self.num_edits]
        if off:
            raise ConfigError(
                f"eval_at {off}: each must be a multiple of edit_batch_size ({self.edit_batch_size}) and at "
                f"most num_edits ({self.num_edits}), so that evaluations fall between batches of the run")
        if self.eval_every % self.edit_batch_size:
            raise ConfigError(
                f"eval_every ({self.eval_every}) must be a multiple of edit_batch_size "
                f"({self.edit_batch_size}) so that evaluations fall between batches")
        for name in ("methods", "tasks"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value or not all(isinstance(x, str) and x for x in value):
                raise ConfigError(f"{name} must be a non-empty list of names, got {value!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods lists a method twice: {self.methods}")
        for name in ("hparams", "overrides", "task_metadata"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        if self.zsre_target not in ("answers", "alt"):
            raise ConfigError(f"zsre_target must be 'answers' or 'alt', got {self.zsre_target!r}")
        self._validate_model_path()
        self._validate_methods()
        self._validate_edit_data()

    def _validate_methods(self) -> None:
        from harness.editors import EDITORS
        from harness.editors.hparams import EditHparams, load_hparams
        from harness.editors.lyaplock import BASES as bases

        for m in self.methods:
            base, _, addon = m.partition("-")
            if base not in EDITORS:
                raise ConfigError(f"unknown method {m!r}{did_you_mean(base, EDITORS)}; known: "
                                  f"{', '.join(sorted(EDITORS))} and lyaplock-<{'|'.join(bases)}>")
            if addon and (base != "lyaplock" or addon not in bases):
                raise ConfigError(f"unknown method {m!r}: only lyaplock takes an add-on base "
                                  f"(lyaplock-{', lyaplock-'.join(bases)})")
        for key in ("hparams", "overrides"):
            stray = set(getattr(self, key)) - set(self.methods) - ({ALL_METHODS} if key == "overrides" else set())
            if stray:
                raise unknown_names_error(f"method(s) in {key}:", stray, self.methods)
        for m, over in self.overrides.items():
            if not isinstance(over, dict):
                raise ConfigError(f"overrides.{m} must be a mapping of hyper-parameters, got {over!r}")
            unknown = set(over) - EditHparams.keys()
            if unknown:
                raise unknown_names_error(f"hyper-parameter(s) in overrides.{m}:", unknown, EditHparams.keys())
        for m in self.methods:
            base, _, addon = m.partition("-")
            over = self.overrides_for(m)
            if addon:
                over["base"] = addon
            over.pop("layers", None)  # may be a "4-8" string, parsed by the wrapper
            try:
                load_hparams(base, self.hparams.get(m), model_name=str(self.model or "smollm2-135m-instruct"),
                             overrides=over)
            except (ValueError, TypeError, FileNotFoundError) as exc:
                raise ConfigError(f"{m}: {exc}") from None

    def overrides_for(self, method: str) -> dict:
        return {**self.overrides.get(ALL_METHODS, {}), **self.overrides.get(method, {})}

    def _validate_model_path(self) -> None:
        if self.model is None:
            return
        text = str(self.model)
        looks_local = text.endswith(".gguf") or text.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(text).expanduser().exists():
            raise ConfigError(f"model {text}: no such file or directory (a hub id looks like org/name)")

    def _validate_edit_data(self) -> None:
        from harness.data import load_edit_data

        available = len(load_edit_data(self.edit_data, zsre_target=self.zsre_target))
        if self.num_edits > available:
            raise ConfigError(
                f"num_edits={self.num_edits} but {self.edit_data} holds {available} records; lower num_edits "
                "or point edit_data at the full data (edit_data=counterfact:full, or a file path)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def checkpoints(self) -> list[int]:
        return sorted({*range(0, self.num_edits + 1, self.eval_every), *self.eval_at, self.num_edits})


# ---------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("seqedit-harness", "torch", "transformers", "lm-eval", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def method_lock(method_dir: Path):
    """Held while a process edits one method, so that two processes sharing an output directory
    (``--only``) cannot both write the same method's state and trace."""
    import fcntl

    method_dir.mkdir(parents=True, exist_ok=True)
    # closing the file releases the lock, also when the process dies
    with open(method_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{method_dir.name} is being run by another process (it holds {method_dir / '.lock'}); "
                             "give each process a different --only") from None
        yield


def memory_mb() -> dict:
    """Resident set size of this process now (Linux; else its peak so far) and, on a GPU, the
    memory torch holds: logged per batch so that growth with the number of edits shows."""
    import resource

    import torch

    info = {}
    rss = proc_status_mb("VmRSS")
    if rss is not None:
        info["rss_mb"] = rss
    peak = proc_status_mb("VmHWM")
    info["peak_rss_mb"] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        info["gpu_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
    return info


# ---------------------------------------------------------------------------- run


def checkpoint_problem(path: Path, method: str, edits: int) -> str | None:
    """Why the results file of a checkpoint cannot be used (None: it can). A file is complete when
    it parses and says which method and point it belongs to; a truncated or foreign one is not."""
    if not path.exists():
        return "missing"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return f"{path.name} is damaged ({exc.__class__.__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        return f"{path.name} holds no lm-eval results"
    tag = data.get("seqedit") or {}
    if tag.get("method") != method or tag.get("num_edits") != edits:
        return f"{path.name} belongs to {tag.get('method')!r} at {tag.get('num_edits')!r} edits"
    return None


STATE_PREVIOUS = ".prev"
CHECKSUM_SUFFIX = ".sha256"


def save_verified_state(obj, path: Path) -> None:
    """Write the edit state atomically with a checksum beside it, keeping the previous state (and
    its checksum) as ``<name>.prev``: a damaged state falls back one save instead of to nothing."""
    from harness.loading import file_sha256

    previous = path.with_name(path.name + STATE_PREVIOUS)
    if path.exists():
        os.replace(path, previous)
        checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
        if checksum.exists():
            os.replace(checksum, previous.with_name(previous.name + CHECKSUM_SUFFIX))
    atomic_torch_save(obj, path)
    atomic_write_text(path.with_name(path.name + CHECKSUM_SUFFIX), file_sha256(path) + "\n")


def load_verified_state(path: Path) -> tuple[dict | None, str]:
    """The newest edit state whose checksum matches and which loads; and what was found wrong on
    the way (empty when nothing)."""
    import torch

    from harness.loading import file_sha256

    found = []
    for candidate in (path, path.with_name(path.name + STATE_PREVIOUS)):
        if not candidate.exists():
            continue
        checksum = candidate.with_name(candidate.name + CHECKSUM_SUFFIX)
        expected = checksum.read_text().strip() if checksum.exists() else None
        if expected != file_sha256(candidate):
            found.append(f"{candidate.name} does not match its checksum" if expected else
                         f"{candidate.name} has no checksum (its save was cut short)")
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=False)
            state["lm"]["edited_case_ids"], state["rng"]  # noqa: B018 - the parts resume needs
        except Exception as exc:  # a file that cannot be read back is damaged, whatever the cause
            found.append(f"{candidate.name} cannot be read ({exc.__class__.__name__})")
            continue
        if found:
            found.append(f"resuming from {candidate.name} ({len(state['lm']['edited_case_ids'])} edits)")
        return state, "; ".join(found)
    if found:
        found.append("no usable edit state: editing again from the start")
    return None, "; ".join(found)


def remove_stale_temporaries(directory: Path, recursive: bool = True, locked: bool = False) -> list[Path]:
    """Remove the ``<file>.tmp<pid>`` copies that an atomic write killed half-way left behind.

    In a method directory whose lock this process holds (``locked``) every such file is stale;
    elsewhere only those whose writing process is gone."""
    removed = []
    if not directory.exists():
        return removed
    for tmp in (directory.rglob if recursive else directory.glob)("*.tmp*"):
        suffix = tmp.name.rpartition(".tmp")[2]
        if not suffix.isdigit() or not tmp.is_file():
            continue
        if not locked and _process_alive(int(suffix)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing while it cleans
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SequentialRun:
    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True,
                 only: list[str] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir).expanduser()
        self.resume = resume
        self.progress = progress
        # a subset of the config's methods for this process: one run split over several processes
        # or machines shares one config and one output directory, each taking different methods
        unknown = [m for m in only or [] if m not in cfg.methods]
        if unknown:
            raise ConfigError(f"--only {','.join(unknown)}: not among this run's methods ({', '.join(cfg.methods)}); "
                             "--only selects from the config's methods, --methods changes them")
        self.methods = [m for m in cfg.methods if m in (only or cfg.methods)]

    # -- manifest / config guard
    # where the run lives and where caches go do not change its results: a run directory moved
    # or copied elsewhere resumes
    PLACE_KEYS = ("output_dir", "cache_dir")
    # what a run whose manifest predates a key did: its value there, for the comparison
    LEGACY_VALUES = {"eval_sample": None, "fluency_sample": None, "eval_at": []}

    def _check_or_write_manifest(self) -> None:
        path = self.out / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("config", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise ConfigError(f"{path} is damaged (not a JSON manifest); restore it from a copy, or remove "
                                  "it to adopt this directory with the current config") from None
            new = json.loads(json.dumps(self.cfg.to_dict()))
            old = {**self.LEGACY_VALUES, **old}
            diff = sorted(k for k in set(new) | set(old) if k not in self.PLACE_KEYS and old.get(k) != new.get(k))
            if diff:
                was = ", ".join(f"{k}: {json.dumps(old.get(k))}" for k in diff)
                raise ConfigError(
                    f"{self.out} already holds a run with a different config (differs in: {', '.join(diff)}; "
                    f"the run has {was}); refusing to mix them: choose another --output_dir or restore the "
                    "original config")
            if not self.resume:
                raise ConfigError(f"{self.out} already holds this run; add --resume to continue it")
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
        atomic_write_text(path, json.dumps(manifest, indent=2, default=_json_default))

    def run(self) -> Path:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out, recursive=False)
        self._check_or_write_manifest()
        cfg = self.cfg
        total = len(self.methods) * cfg.num_edits
        self.bar = tqdm(total=total, desc="sequential run", unit="edit", disable=not self.progress, dynamic_ncols=True)
        for method in self.methods:
            with method_lock(self._method_dir(method)):
                self._run_method(method)
        self.bar.close()
        return self.out

    def _method_dir(self, method: str) -> Path:
        return self.out / method

    def _build_lm(self, method: str):
        from lm_eval.api.registry import get_model

        from harness.models import EditingLM

        base, _, addon = method.partition("-")
        cls = get_model(f"{base}_hf")
        assert issubclass(cls, EditingLM)
        overrides = self.cfg.overrides_for(method)
        if addon:
            overrides["base"] = addon
        return cls(
            pretrained=self.cfg.model, edit_data=self.cfg.edit_data, num_edits=0,
            edit_batch_size=self.cfg.edit_batch_size, hparams=self.cfg.hparams.get(method),
            seed=self.cfg.seed, cache_dir=self.cfg.cache_dir, dtype=self.cfg.dtype, device=self.cfg.device,
            zsre_target=self.cfg.zsre_target, progress=False, batch_size=self.cfg.eval_batch_size, **overrides)

    def _run_method(self, method: str) -> None:

        cfg = self.cfg
        mdir = self._method_dir(method)
        removed = remove_stale_temporaries(mdir, locked=True)
        if removed:
            self.bar.write(f"[{method}] removed {len(removed)} half-written file(s) a killed process left: "
                           + ", ".join(str(r.relative_to(mdir)) for r in removed))
        damaged = {}
        for p in cfg.checkpoints():
            why = checkpoint_problem(self._checkpoint_path(method, p), method, p)
            if why is not None and why != "missing":
                self.bar.write(f"[{method}] checkpoint at {p} edits: {why}; recomputing it")
                self._checkpoint_path(method, p).unlink()
            if why is not None:
                damaged[p] = why
        if not damaged:
            # every result is on disk: nothing to redo, even where state/ was not kept (a run
            # directory committed without its edit states and resumed on another machine)
            self.bar.write(f"[{method}] complete: all {len(cfg.checkpoints())} checkpoints on disk")
            count_as_done_before(self.bar, cfg.num_edits)
            return
        state_path = mdir / "state" / "edit_state.pt"
        trace_path = mdir / "trace.jsonl"
        t0 = time.perf_counter()
        lm = self._build_lm(method)
        self._record_setup(method, "model_load_seconds", time.perf_counter() - t0)
        done = 0
        state, state_report = load_verified_state(state_path)
        if state_report:
            self.bar.write(f"[{method}] {state_report}")
        if state is not None:
            saved_edits = len(state["lm"]["edited_case_ids"])
            gaps = [p for p, why in damaged.items() if p < saved_edits]
            if gaps:
                self.bar.write(f"[{method}] the checkpoint at {gaps[0]} edits must be recomputed and the saved "
                               f"state is at {saved_edits} edits: editing again from the start (the checkpoints "
                               "on disk are kept)")
                state = None
        if state is not None:
            lm.load_edit_state(state["lm"])
            _set_rng_state(state["rng"])
            done = lm.num_edited
            self._restore_trace(trace_path, lm.trace, method)
            log.info("%s: resumed after %d edits", method, done)
        else:
            trace_path.unlink(missing_ok=True)
            _seed_everything(cfg.seed)
        count_as_done_before(self.bar, done)
        stream = lm.stream[: cfg.num_edits]
        lm.check_prompt_lengths(stream[done:])
        batches_since_save = 0

        forecast_due = True

        def on_batch(record):
            nonlocal batches_since_save, forecast_due
            record = {**record, **memory_mb()}
            if forecast_due:
                forecast_due = False
                self.bar.write(f"[{method}] " + self._forecast(method, record))
            with open(trace_path, "a") as fh:
                fh.write(json.dumps(record, default=_json_default) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            batches_since_save += 1
            self.bar.update(record["batch_size"])
            if batches_since_save >= cfg.save_every:
                self._save_state(lm, state_path)
                batches_since_save = 0

        prepare_recorded = False
        for point in cfg.checkpoints():
            if point > done:
                lm.apply_edits(stream[done:point], on_batch=on_batch)
                done = point
                if not prepare_recorded and getattr(lm.editor, "prepare_seconds", None) is not None:
                    # context templates, key statistics (computed or read from the cache), projectors
                    self._record_setup(method, "prepare_seconds", lm.editor.prepare_seconds)
                    prepare_recorded = True
                if batches_since_save:  # the state at every checkpoint is saved (once)
                    self._save_state(lm, state_path)
                    batches_since_save = 0
            if point == done:
                self._evaluate(lm, method, point)

    def _forecast(self, method: str, first_batch: dict) -> str:
        """What is left of this process's work, in hours, from this batch's seconds per edit and the
        evaluation seconds of the checkpoints on disk (the pre-edited one if none later)."""
        cfg = self.cfg
        rate = first_batch["edit_seconds"] / max(1, first_batch["batch_size"])
        later = self.methods[self.methods.index(method) + 1:]
        edits_left = cfg.num_edits - first_batch["edits_done"] + cfg.num_edits * len(later)
        measured = {}
        for p in cfg.checkpoints():
            path = self._checkpoint_path(method, p)
            if path.exists():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                    measured[p] = sum(json.loads(path.read_text())["seqedit"]["evaluation_seconds"].values())
        # checkpoints after editing began if there are any, else the pre-edited one (a sample of the
        # same size)
        after = [x for p, x in measured.items() if p] or list(measured.values())
        per_checkpoint = sum(after) / len(after) if after else None
        points_left = sum(1 for p in cfg.checkpoints() if p >= first_batch["edits_done"]
                          and not self._checkpoint_path(method, p).exists()) + len(cfg.checkpoints()) * len(later)
        editing_h = edits_left * rate / 3600
        text = f"forecast: {edits_left:,} edits left at {rate:.2f} s/edit = {editing_h:.1f} h of editing"
        total_h = editing_h
        if per_checkpoint is not None:
            eval_h = points_left * per_checkpoint / 3600
            total_h += eval_h
            text += (f"; {points_left} checkpoints at about {per_checkpoint / 60:.0f} min = {eval_h:.1f} h of "
                     "evaluation (the last one scores every edited record: longer)")
        finish = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + total_h * 3600))
        return text + f"; done about {finish} if nothing else runs"

    def _record_setup(self, method: str, name: str, value: float) -> None:
        """One-off costs of each (re)start of a method, appended to ``<method>/setup.jsonl``."""
        path = self._method_dir(method) / "setup.jsonl"
        with open(path, "a") as fh:
            fh.write(json.dumps({name: value, "time": time.time()}) + "\n")

    def _save_state(self, lm, path: Path) -> None:
        save_verified_state({"lm": lm.edit_state(), "rng": _get_rng_state()}, path)

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
        atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept))

    def _copy_pre_edited(self, method: str, path: Path) -> bool:
        """Before its first edit every method holds the same untouched model and is scored with the
        same seeds, so the pre-edited checkpoint is evaluated once per run and copied to the other
        methods (for a long run of many methods, a large share of the scoring time)."""
        for other in self.cfg.methods:
            source = self._checkpoint_path(other, 0)
            if other == method or not source.exists():
                continue
            results = json.loads(source.read_text())
            results["seqedit"] = {**results["seqedit"], "method": method, "pre_edited_from": other}
            if source.with_name("samples.json").exists():
                atomic_write_text(path.with_name("samples.json"), source.with_name("samples.json").read_text())
            atomic_write_text(path, json.dumps(results, indent=2, default=_json_default))
            self.bar.write(f"[{method} @ 0 edits] the pre-edited model's results, as evaluated for {other}")
            return True
        return False

    def _checkpoint_path(self, method: str, point: int) -> Path:
        return self._method_dir(method) / "checkpoints" / f"edits_{point:06d}" / "results.json"

    def _evaluate(self, lm, method: str, point: int) -> None:
        path = self._checkpoint_path(method, point)
        if path.exists():
            return
        if point == 0 and self._copy_pre_edited(method, path):
            return
        if getattr(self, "task_manager", None) is None:
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
            atomic_write_text(path.with_name("samples.json"), json.dumps(samples, default=_json_default))
        atomic_write_text(path, json.dumps(results, indent=2, default=_json_default))
        shutil.rmtree(partial_dir, ignore_errors=True)
        self.bar.write(f"[{method} @ {point} edits] " + summarize(results))


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
    (``harness.sampling``; every record when ``final``), the rest with ``limit``.

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
                atomic_write_text(partial, json.dumps(res, default=_json_default))
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


def summarize(results: dict) -> str:
    parts = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias":
                parts.append(f"{task}/{k.split(',')[0]}={v:.3g}")
    return " ".join(parts[:12])


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


# ---------------------------------------------------------------------------- CLI


def _comma_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


FLAG_HELP = {
    "model": "pretrained model: hub id, local directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    "model_name": "model name in results and tables",
    "methods": "comma-separated editing methods (lyaplock-<base> for the add-on)",
    "edit_data": "counterfact | zsre (bundled samples), counterfact:full | zsre:full, counterfact:edit (the "
                 "10,000-record edit split) | zsre:all (eval + train, 2,037; both from $SEQEDIT_DATA_DIR), or a file path",
    "num_edits": "edits applied in the run (0: only the pre-edited model)",
    "edit_batch_size": "edits per batch",
    "eval_every": "edits between evaluations (a multiple of --edit_batch_size)",
    "eval_at": "comma-separated extra checkpoints, in edits (multiples of --edit_batch_size), e.g. 100,500",
    "tasks": "comma-separated lm-eval tasks",
    "limit": "documents per general-capability task (editing tasks: see --eval_sample)",
    "eval_sample": "edited records the editing tasks score at a checkpoint: the first batch and a seeded "
                   "share of every tenth of the edits; the last checkpoint scores all (all: always all)",
    "fluency_sample": "edited records whose text is sampled for fluency at a checkpoint, spread over the "
                      "tenths of the edits; the last checkpoint samples all (all: always all)",
    "num_fewshot": "few-shot examples (the tasks' own setting when unset)",
    "eval_batch_size": "lm-eval batch size",
    "task_metadata": "metadata passed to the tasks, as JSON",
    "confirm_run_unsafe_code": "allow the code tasks to run model-written programs (in the sandbox)",
    "log_samples": "keep per-document samples next to each checkpoint",
    "hparams": 'per-method hyper-parameter file or name, as JSON ({"memit": "smollm2-135m"})',
    "overrides": 'hyper-parameter overrides for every method (alpha=10,l2=5) or per method as JSON '
                 '({"lyaplock": {"alpha": 10}})',
    "output_dir": "run directory",
    "seed": "seed of every random draw",
    "save_every": "batches between saved edit states",
    "dtype": "model dtype",
    "device": "torch device (cuda when available, else cpu)",
    "cache_dir": "cache for statistics and dequantised models ($SEQEDIT_CACHE or ~/.cache/seqedit)",
    "zsre_target": "ZsRE edit target: answers (ROME/MEMIT/AlphaEdit/LyapLock) or alt (EasyEdit)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqedit run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="run config YAML; flags override its fields (default: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir (default: off)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (default: shown)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a configuration or data error (default: one line)")
    p.add_argument("--only", type=_comma_list, default=None,
                   help="comma-separated subset of the config's methods for this process (split one run "
                        "over processes or machines; each takes different methods, all use --resume) "
                        "(default: all)")
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        flag = f"--{f.name}"
        default = getattr(defaults, f.name)
        shown = (",".join(map(str, default)) or None) if isinstance(default, list) else json.dumps(default) if isinstance(default, dict) else default
        if f.name in ("confirm_run_unsafe_code", "log_samples"):
            shown = "off"
        help_text = f"{FLAG_HELP[f.name]} (default: {'none' if shown is None else shown})".replace("%", "%%")
        if f.name in ("methods", "tasks"):
            p.add_argument(flag, type=_comma_list, help=help_text)
        elif f.name == "eval_at":
            p.add_argument(flag, type=_int_list, help=help_text)
        elif f.name == "overrides":
            p.add_argument(flag, type=_overrides_arg, help=help_text)
        elif f.name in ("task_metadata", "hparams"):
            p.add_argument(flag, type=_json_arg(f.name), help=help_text)
        elif f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name in ("eval_sample", "fluency_sample"):
            p.add_argument(flag, help=help_text)  # a number or "all", checked by RunConfig.validate
        elif f.type in ("int", "int | None"):
            p.add_argument(flag, type=int, help=help_text)
        else:
            p.add_argument(flag, help=help_text)
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _json_arg(name: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
        return value

    parse.__name__ = name
    return parse


def _overrides_arg(text: str):
    """JSON per method, or ``key=value,...`` for every method of the run (stored under ``"*"``)."""
    if text.lstrip().startswith("{"):
        return _json_arg("overrides")(text)
    pairs = {}
    for item in _comma_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        pairs[key.strip()] = yaml.safe_load(value)
    return {ALL_METHODS: pairs}


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
