"""The run config: what a sequential run edits, with which methods, how far, and what it scores.

A run config is YAML whose every field is also a ``seqedit run`` flag (:func:`build_parser`);
:meth:`RunConfig.validate` checks everything that can be checked without a model, so that a
mistake is one line naming the fix before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.errors import ConfigError, did_you_mean, unknown_names_error, whole_number

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
    device_map: str | dict | None = None  # transformers' device_map: "auto", or module -> device
    offload_folder: str | None = None
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
        if self.device_map is not None and not isinstance(self.device_map, (str, dict)):
            raise ConfigError(f"device_map must be a name such as auto or a mapping of module names to devices, "
                              f"got {self.device_map!r}")
        if self.zsre_target not in ("answers", "alt"):
            raise ConfigError(f"zsre_target must be 'answers' or 'alt', got {self.zsre_target!r}")
        self._validate_model_path()
        self._validate_methods()
        self._validate_unsafe_tasks()
        self._validate_edit_data()

    def _validate_methods(self) -> None:
        from harness.editors import EDITORS
        from harness.editors.hparams import EditHparams
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
            self.method_hparams(m)

    def method_hparams(self, method: str):
        """The hyper-parameters ``method`` edits with in this run: its file (named, or the one
        matching the model) under the run's overrides, as the wrapper resolves them."""
        from harness.editors.hparams import load_hparams

        base, _, addon = method.partition("-")
        over = self.overrides_for(method)
        if addon:
            over["base"] = addon
        try:
            return load_hparams(base, self.hparams.get(method), model_name=str(self.model or "smollm2-135m-instruct"),
                                overrides=over)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise ConfigError(f"{method}: {exc}") from None

    def _validate_unsafe_tasks(self) -> None:
        # lm-eval refuses these only when it reaches them, after the model has loaded and the
        # pre-edit checkpoint's other tasks have run (minutes); a sweep would fail every cell alike
        if self.confirm_run_unsafe_code:
            return
        unsafe = sorted(set(self.tasks) & unsafe_task_names())
        if unsafe:
            raise ConfigError(
                f"tasks {', '.join(unsafe)} run model-written programs (in the sandbox); lm-eval runs them only "
                "when allowed: add confirm_run_unsafe_code: true to the config (seqedit run "
                "--confirm_run_unsafe_code), or leave them out of tasks")

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



def unsafe_task_names() -> set[str]:
    """Our tasks whose YAML sets ``unsafe_code`` (they execute generated code)."""
    from harness import tasks_dir

    class _TagTolerantLoader(yaml.SafeLoader):
        pass

    # lm-eval's YAML tags (!function) name Python callables; only plain keys are read here
    _TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names = set()
    for path in Path(tasks_dir()).glob("*/*.yaml"):
        with open(path) as fh:
            spec = yaml.load(fh, Loader=_TagTolerantLoader) or {}
        if isinstance(spec, dict) and spec.get("unsafe_code") and isinstance(spec.get("task"), str):
            names.add(spec["task"])
    return names


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
    "device_map": 'transformers device_map for a model larger than one device: auto (shard over the GPUs, '
                  'offload the rest to the CPU, then to --offload_folder), or JSON {"module": device}; '
                  "takes precedence over --device",
    "offload_folder": "where device_map offloads weights to disk",
    "cache_dir": "cache for statistics and dequantised models ($SEQEDIT_CACHE or ~/.cache/seqedit)",
    "zsre_target": "ZsRE edit target: answers (ROME/MEMIT/AlphaEdit/LyapLock) or alt (EasyEdit)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqedit run",
        description="Sequential editing runs: edit in batches, evaluate with lm-eval every N edits, resume after a crash.")
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
        elif f.name == "device_map":
            p.add_argument(flag, type=_device_map_arg, help=help_text)
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


def _device_map_arg(text: str):
    """A device_map name (auto, balanced, ...) or a JSON mapping of module names to devices."""
    return _json_arg("device_map")(text) if text.lstrip().startswith("{") else text


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
