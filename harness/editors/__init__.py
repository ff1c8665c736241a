"""Locate-then-edit machinery shared by every editor, and the editors themselves.

Shared components (written once): context templates (``context``), keys (``keys``), target values
(``targets``), key second-moment statistics (``stats``), closed-form solves and preservation loss
(``solvers``), and the batch loop with MEMIT's residual spreading (``base``). An editor
(``memit``, ``alphaedit``, ``lyaplock``, ...) only supplies its per-layer solve and its state.
"""

EDITORS = {
    "memit": "harness.editors.memit:MEMITEditor",
    "alphaedit": "harness.editors.alphaedit:AlphaEditEditor",
    "lyaplock": "harness.editors.lyaplock:LyapLockEditor",
    "ft": "harness.editors.ft:FTEditor",
    "rome": "harness.editors.rome:ROMEEditor",
    "prune": "harness.editors.prune:PRUNEEditor",
    "rect": "harness.editors.rect:RECTEditor",
    "rlsedit": "harness.editors.rlsedit:RLSEditEditor",
    "encore": "harness.editors.encore:ENCOREEditor",
}


def editor_class(method: str):
    import importlib

    if method not in EDITORS:
        raise KeyError(f"unknown editing method {method!r}; known: {sorted(EDITORS)}")
    module, _, cls = EDITORS[method].partition(":")
    return getattr(importlib.import_module(module), cls)
