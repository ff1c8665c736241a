"""Which editing model is under evaluation.

lm-eval builds task requests without handing the model to the task, yet our editing tasks must
score exactly the records the editing wrapper has edited so far. Every editing wrapper
announces itself here when it is built; the tasks ask ``active_editor()``. A weak reference, so
a model that is gone is never reported.
"""

from __future__ import annotations

import weakref

_active: weakref.ref | None = None


def register_editor(lm) -> None:
    global _active
    _active = weakref.ref(lm)


def clear_editor(lm=None) -> None:
    global _active
    if lm is None or (_active is not None and _active() is lm):
        _active = None


def active_editor():
    """The most recently built editing wrapper that is still alive, or None."""
    return _active() if _active is not None else None
