"""Where a module computes and where its weights are, for models dispatched by accelerate.

A model loaded with ``device_map`` (``"auto"``, or a map sending blocks to several GPUs, the CPU
or the disk) carries accelerate hooks: each block computes on its own *execution device*, and an
offloaded block keeps its weights outside the module (its parameters are on ``meta`` between
forward passes, the values in the hook's ``weights_map``). Editing must then read and write the
edited weight where it really is, and compute each layer's statistics, keys and update on that
layer's execution device. Without hooks every function here reduces to the plain parameter and
its device.
"""

from __future__ import annotations

import torch


def _align_hook(module):
    """The accelerate hook of ``module`` that places it (an ``AlignDevicesHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if hasattr(h, "execution_device"):
            return h
    return None


def _offload_hook(module):
    hook = _align_hook(module)
    if hook is not None and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
        return hook
    return None


def execution_device(module) -> torch.device:
    """The device ``module`` computes on: its hook's execution device when dispatched, else the
    device of its first parameter (CPU for a module without any)."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        device = hook.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model) -> torch.device:
    """Where token ids go: the execution device of the input embeddings."""
    return execution_device(model.get_input_embeddings())


def is_offloaded(module) -> bool:
    return _offload_hook(module) is not None


def read_parameter(module, name: str = "weight") -> torch.Tensor:
    """The current value of ``module.<name>``: the parameter itself (a view: writes to it reach the
    model), or for an offloaded module its value in the offload map (read-only: write it back
    with :func:`write_parameter`)."""
    hook = _offload_hook(module)
    if hook is None:
        return getattr(module, name)
    return hook.weights_map[name]


@torch.no_grad()
def write_parameter(module, name: str, value: torch.Tensor) -> None:
    """Set ``module.<name>`` to ``value`` where the model reads it from.

    For an offloaded module the new value replaces the entry of the offload map, held in memory
    (accelerate's loader serves its in-memory state dict before the files on disk), so that the
    next forward pass loads the edited weight; the files of the other weights are untouched."""
    hook = _offload_hook(module)
    if hook is None:
        param = getattr(module, name)
        param.copy_(value.to(param.device, param.dtype))
        return
    weights_map = hook.weights_map
    old = weights_map[name]
    new = value.detach().to(old.device, old.dtype).clone()
    prefix = getattr(weights_map, "prefix", None)
    dataset = getattr(weights_map, "dataset", None)
    if prefix is not None and dataset is not None:  # PrefixedDataset over a loader or a dict
        store = getattr(dataset, "state_dict", dataset)
        store[f"{prefix}{name}"] = new
    else:  # a plain mapping of this module's tensors
        weights_map[name] = new
    if read_parameter(module, name) is not new:
        raise RuntimeError(f"could not write the offloaded {name} of {type(module).__name__}: its accelerate "
                           f"weights map ({type(weights_map).__name__}) did not take the new value")


def named_parameter_values(model):
    """(name, value) of every parameter, offloaded ones read from their offload map (the model's
    ``named_parameters`` shows those on ``meta``)."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            value = read_parameter(module, name) if param.device.type == "meta" else param
            yield (f"{module_name}.{name}" if module_name else name), value
