"""Hyper-parameters: YAML files per method and model family under configs/hparams/<method>/.

A file may ``inherit`` another (relative name in the same directory or ``<method>/<name>``);
keys given as model args (``alpha=...``) override the file. Unknown keys are an error, so a typo
in a config never silently falls back to a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from harness.errors import ConfigError, unknown_names_error

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "configs" / "hparams"


@dataclass
class EditHparams:
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    # target-value optimisation (reference "compute_z")
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int | None = None  # None: the last layer
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 5e-2
    # requests whose target values are optimised together: bounds memory at large edit batches;
    # the results do not depend on it (each request's delta is independent)
    v_batch_size: int = 32
    # most-probable early stopping (ENCORE): stop after |mpes_patience| iterations in which
    # every target token is top-1 on the context-templated prompts; 0 disables it
    mpes_patience: int = 0
    # [max_length, count] per template group; "{}" alone is always the first group
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    # covariance statistics
    mom2_update_weight: float = 15000.0
    stats_corpus: str = "bundled"
    stats_samples: int = 1000
    stats_max_tokens: int | None = 256  # tokens per text; null: the model's context length
    # method-specific knobs (documented in each editor)
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    alpha: float = 60.0
    lyapunov_v: float = 1.0
    queue_b: float = 0.0
    queue_a: str | float = "1_sqrtD"
    queue_z0: str | float = "1sqrtD"
    queue_floor: str | float = "1sqrtD"
    base: str = "memit"  # LyapLock's per-layer solve: memit | prune | rect | alphaedit
    rect_keep_fraction: float = 0.4
    update_norm_lambda: float = 0.0
    lambda_reg: float = 0.0
    mu_reg: float = 1.0
    ft_lr: float = 5e-4
    ft_steps: int = 25  # epochs over the batch
    ft_batch_size: int = 64  # requests per Adam step
    ft_weight_decay: float = 0.0
    ft_norm_constraint: float | None = 5e-4  # L-inf box half-width; null: unconstrained
    ft_layer: int | None = None  # FT's trained layer; None: the layers list
    ft_loss: str = "last_position"  # the reference's; or teacher_forced (see editors/ft.py)
    description: str = ""

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def available(method: str) -> list[str]:
    d = HPARAMS_DIR / method
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _read(path: Path, seen=()) -> dict:
    if path in seen:
        raise ValueError(f"hparams inheritance loop at {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    parent = data.pop("inherit", None)
    data.pop("match", None)
    if parent:
        ppath = HPARAMS_DIR / f"{parent}.yaml" if "/" in parent else path.parent / f"{parent}.yaml"
        base = _read(ppath, (*seen, path))
        base.update(data)
        data = base
    return data


def family_for_model(method: str, model_name: str) -> str:
    """Pick the hparams file whose ``match`` list has a substring of the model name."""
    name = model_name.lower()
    for stem in available(method):
        with open(HPARAMS_DIR / method / f"{stem}.yaml") as fh:
            data = yaml.safe_load(fh) or {}
        if any(m.lower() in name for m in data.get("match", [])):
            return stem
    raise ConfigError(
        f"no {method} hyper-parameters match model {model_name!r}; pass hparams=<name> "
        f"(one of {available(method)}) or hparams=/path/to/file.yaml"
    )


def parse_layers(value):
    """'4-8' -> [4..8]; '4|5|6' or '4 5 6' -> [4, 5, 6]; ints and lists pass through."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    text = str(value).strip()
    try:
        if "-" in text and "|" not in text:
            lo, hi = (int(x) for x in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.replace("|", " ").split()]
    except ValueError:
        raise ConfigError(f"layers={value!r}: expected a range (4-8) or layer numbers (4|5|6)") from None


def load_hparams(method: str, hparams: str | os.PathLike | dict | None = None,
                 model_name: str = "", overrides: dict | None = None) -> EditHparams:
    if isinstance(hparams, dict):
        data = dict(hparams)
    else:
        if hparams is None:
            hparams = family_for_model(method, model_name)
        path = Path(str(hparams))
        if not path.suffix:
            path = HPARAMS_DIR / method / f"{hparams}.yaml"
        if not path.exists():
            raise ConfigError(
                f"hparams {hparams!r} not found for {method}; available: {available(method)}"
            )
        data = _read(path)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "layers" in overrides:  # a model arg or a command-line flag gives it as text
        overrides["layers"] = parse_layers(overrides["layers"])
    data.update(overrides)
    unknown = set(data) - EditHparams.keys()
    if unknown:
        raise unknown_names_error("hyper-parameter(s)", unknown, EditHparams.keys())
    return EditHparams(**{k: _typed(k, v) for k, v in data.items()})


_FIELD_TYPES = {f.name: str(f.type) for f in fields(EditHparams)}


def _typed(key: str, value):
    """``value`` as the field's type (a number written ``5e-4`` is a string to YAML 1.1), or an
    error naming the key: a wrong type must not surface as a crash in the middle of an edit."""
    kind = _FIELD_TYPES[key]
    optional = kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"hyper-parameter {key} may not be null")
    base = kind.removesuffix(" | None")

    def number(v, integer):
        if isinstance(v, str):
            try:
                v = int(v) if integer and v.strip().lstrip("-").isdigit() else float(v)
            except ValueError:
                return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        if integer:
            return v if isinstance(v, int) else (int(v) if float(v).is_integer() else None)
        return float(v)

    if base in ("int", "float"):
        out = number(value, base == "int")
        if out is None:
            raise ConfigError(f"hyper-parameter {key} must be {'a whole number' if base == 'int' else 'a number'}, got {value!r}")
        return out
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"hyper-parameter {key} must be text, got {value!r}")
        return value
    if base == "list[int]":
        if not isinstance(value, list) or not value or any(number(v, True) is None for v in value):
            raise ConfigError(f"hyper-parameter {key} must be a non-empty list of whole numbers, got {value!r}")
        return [number(v, True) for v in value]
    if base == "list[list[int]]":
        if not isinstance(value, list) or any(not isinstance(g, list) or len(g) != 2 or any(number(v, True) is None for v in g) for g in value):
            raise ConfigError(f"hyper-parameter {key} must be a list of [max_length, count] pairs, got {value!r}")
        return [[number(v, True) for v in g] for g in value]
    if base == "str | float":
        if isinstance(value, str):
            return value
        out = number(value, False)
        if out is None:
            raise ConfigError(f"hyper-parameter {key} must be a number or a named rule, got {value!r}")
        return out
    return value
