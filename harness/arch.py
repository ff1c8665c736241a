"""Architecture facts (module names, weight orientation) looked up from configs/architectures.yaml."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import yaml

from harness.errors import UserError

ARCH_FILE = os.path.join(os.path.dirname(__file__), "configs", "architectures.yaml")


class UnknownArchitectureError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return self.args[0]


@dataclass(frozen=True)
class Architecture:
    name: str
    layer: str
    mlp: str
    mlp_out: str
    transposed: bool
    final_norm: str
    lm_head: str
    num_layers: str
    mlp_out_norm: str | None = None  # a norm between the MLP output and the residual stream

    def layer_name(self, i: int) -> str:
        return self.layer.format(i)

    def mlp_name(self, i: int) -> str:
        return self.mlp.format(i)

    def mlp_out_name(self, i: int) -> str:
        return self.mlp_out.format(i)

    def mlp_out_norm_name(self, i: int) -> str | None:
        return self.mlp_out_norm.format(i) if self.mlp_out_norm else None

    def n_layers(self, config) -> int:
        return int(getattr(config, self.num_layers))


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Architecture]:
    with open(ARCH_FILE) as fh:
        raw = yaml.safe_load(fh)
    table = {}
    for name, entry in raw.items():
        types = entry.pop("model_types")
        arch = Architecture(name=name, **entry)
        for t in types:
            table[t] = arch
    return table


def architecture_for(model_or_config) -> Architecture:
    """The declared architecture of a model (or its config); a clear error when undeclared."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    table = _table()
    if model_type in table:
        return table[model_type]
    raise UnknownArchitectureError(
        f"Architecture '{model_type}' is not declared for editing. Add an entry to {ARCH_FILE} "
        "with its model_types and the module names: layer (block, e.g. 'model.layers.{}'), "
        "mlp, mlp_out (the MLP output projection whose weight is edited, e.g. "
        "'model.layers.{}.mlp.down_proj'), transposed (true for GPT-2-style Conv1D weights), "
        f"final_norm, lm_head and num_layers. Declared: {sorted(table)}"
    )


def get_module(model, name: str):
    module = model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def edit_module(model, arch: Architecture, layer: int):
    """The module whose weight is edited at ``layer`` (the MLP output projection)."""
    return get_module(model, arch.mlp_out_name(layer))


def edit_weight(model, arch: Architecture, layer: int):
    """The edited weight of ``layer`` in its stored orientation (see ``transposed``): the parameter,
    or for a layer offloaded by accelerate its value in the offload map
    (:func:`harness.placement.read_parameter`)."""
    from harness.placement import read_parameter

    return read_parameter(edit_module(model, arch, layer))


def weight_as_out_in(weight, arch: Architecture):
    """A (d_out, d_in) view of an edited weight, whatever its storage orientation."""
    return weight.T if arch.transposed else weight
