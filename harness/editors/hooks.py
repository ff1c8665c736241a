"""Reading module inputs/outputs during a forward pass, and stopping the pass early."""

from __future__ import annotations

import contextlib

import torch


class StopForward(Exception):
    """Raised by a hook once everything needed has been captured: the layers above are skipped."""


@contextlib.contextmanager
def capture(modules: dict[str, torch.nn.Module], what: str = "input", stop_after: str | None = None):
    """Record the input (first positional arg) or output of each named module; optionally abort
    the forward pass after module ``stop_after`` ran."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make(name):
        def hook(module, args, output):
            value = args[0] if what == "input" else (output[0] if isinstance(output, tuple) else output)
            store[name] = value
            if name == stop_after:
                raise StopForward

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until(model, stop: bool, **inputs):
    """Run ``model(**inputs)``; a StopForward from a hook ends it quietly."""
    try:
        return model(**inputs, use_cache=False)
    except StopForward:
        if not stop:
            raise
        return None
