"""Make ``lm_eval`` see our models and tasks without extra flags.

lm-eval 0.4.13 has no plugin entry points, so ``harness_lm_eval.pth`` imports this module at
interpreter start-up. It costs one meta-path finder (1-2 ms of start-up, measured in
BENCHMARKS.md): nothing is imported until lm-eval itself
imports its registry or task manager, and then only lazy ``"module:Class"`` placeholders are
registered, so ``lm_eval --model hf`` pays nothing for us (beyond accepting a ``.gguf`` path).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys

from harness import MODEL_NAMES, tasks_dir

_WATCHED = ("lm_eval.api.registry", "lm_eval.tasks.manager", "lm_eval.models.huggingface",
            "lm_eval.evaluator")


def register_models(registry_module) -> None:
    # lm-eval fills its built-in table only while the registry is empty; load it first so that
    # registering ours does not hide "hf" and friends (the table is lazy placeholders: cheap)
    importlib.import_module("lm_eval.models")
    registry = registry_module.model_registry
    for alias, cls_name in MODEL_NAMES.items():
        if alias not in registry:
            registry.register(alias, target=f"harness.models:{cls_name}")


def add_task_path(manager_module) -> None:
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_harness_patched", False):
        return
    original_init = cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        ours = os.path.realpath(tasks_dir())
        given = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        include_path = [ours, *[p for p in given if os.path.realpath(str(p)) != ours]]
        original_init(self, *args, include_path=include_path, **kwargs)

    __init__._harness_patched = True
    __init__.__wrapped__ = original_init
    cls.__init__ = __init__


def accept_gguf_path(hf_module) -> None:
    """Let lm-eval's own ``hf`` model take ``pretrained=FILE.gguf`` as our wrappers do: the file
    is dequantised once into our cache and loaded from there. Dequantised GGUF weights produce subnormal
    activations that slow x86 CPUs ~15x, so such loads also flush subnormals (see loading.py)."""
    cls = hf_module.HFLM
    if getattr(cls.__init__, "_harness_patched", False):
        return
    original_init = cls.__init__

    def __init__(self, pretrained="gpt2", *args, **kwargs):
        if isinstance(pretrained, str) and pretrained.endswith(".gguf") and not kwargs.get("gguf_file"):
            from harness.loading import (
                dequantised_dir,
                enable_fast_cpu_math,
                resolve_dtype,
                resolve_pretrained,
            )

            _, gguf = resolve_pretrained(pretrained)
            pretrained = str(dequantised_dir(gguf, resolve_dtype(kwargs.get("dtype", "auto"))))
            enable_fast_cpu_math()
        original_init(self, pretrained, *args, **kwargs)

    __init__._harness_patched = True
    __init__.__wrapped__ = original_init
    cls.__init__ = __init__
    from harness.generation import install as route_total_length_sampling

    route_total_length_sampling(cls)


def check_hub_data_first(evaluator_module) -> None:
    """Before one of our editing wrappers is built (and edits), check that the hub datasets of the
    requested tasks can be had. Under the lm_eval CLI a user mistake our code reports (a missing
    dataset, an unknown model argument, bad edit data) is one line and exit code 2; the traceback
    stays available with SEQEDIT_DEBUG=1."""
    original = evaluator_module.simple_evaluate
    if getattr(original, "_harness_patched", False):
        return

    def simple_evaluate(*args, **kwargs):
        from harness.errors import UserError, debug_enabled

        try:
            model = kwargs.get("model", args[0] if args else None)
            tasks = kwargs.get("tasks")
            if isinstance(model, str) and model in MODEL_NAMES and tasks:
                from harness.hub_datasets import preflight

                if kwargs.get("task_manager") is None:
                    from lm_eval.tasks import TaskManager

                    kwargs["task_manager"] = TaskManager(metadata=kwargs.get("metadata"))
                names = tasks if isinstance(tasks, (list, tuple)) else [tasks]
                preflight(kwargs["task_manager"], names)
            return original(*args, **kwargs)
        except UserError as exc:
            if _under_lm_eval_cli() and not debug_enabled():
                print(f"lm_eval: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    simple_evaluate._harness_patched = True
    simple_evaluate.__wrapped__ = original
    simple_evaluate.__doc__ = original.__doc__
    evaluator_module.simple_evaluate = simple_evaluate


def _under_lm_eval_cli() -> bool:
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    parent = os.path.basename(os.path.dirname(sys.argv[0])) if sys.argv else ""
    return program in ("lm_eval", "lm-eval") or (program == "__main__.py" and parent == "lm_eval")


_AFTER_LOAD = {
    "lm_eval.api.registry": register_models,
    "lm_eval.tasks.manager": add_task_path,
    "lm_eval.models.huggingface": accept_gguf_path,
    "lm_eval.evaluator": check_hub_data_first,
}


class _Loader:  # the loader protocol; importlib.abc alone costs 25 ms at start-up
    def __init__(self, inner, fullname):
        self._inner = inner
        self._fullname = fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            _AFTER_LOAD[self._fullname](module)
        except Exception as exc:  # never break lm-eval itself
            print(f"[harness] could not register with lm-eval: {exc!r}", file=sys.stderr)


class _Finder:  # the meta path finder protocol
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _WATCHED:  # lm-eval already imported (e.g. hook installed late)
        if name in sys.modules:
            _AFTER_LOAD[name](sys.modules[name])


install()
