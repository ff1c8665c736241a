"""User mistakes (a bad config, bad data, a wrong path) as one exception family.

Everything raised for something the user can fix derives from :class:`UserError`; the command
lines (``seqedit``, our wrappers under ``lm_eval``) print such an error as one line and exit
with code 2, keeping the traceback for ``--debug`` (or ``SEQEDIT_DEBUG=1`` under ``lm_eval``).
Faults of the program itself stay ordinary exceptions with their traceback.
"""

from __future__ import annotations

import difflib
import os


class UserError(Exception):
    """Mixin marking an exception as the user's to fix (the message says how)."""


class ConfigError(UserError, ValueError):
    """A run config, flag or model argument that cannot be used."""


def did_you_mean(name: str, valid) -> str:
    """`` (did you mean 'alpha'?)`` for the closest valid name, or nothing."""
    close = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_names_error(what: str, unknown, valid) -> ConfigError:
    unknown = sorted(unknown)
    hints = "".join(f"{n!r}{did_you_mean(n, valid)}; " for n in unknown)
    return ConfigError(f"unknown {what} {hints}valid names: {', '.join(sorted(valid))}")


def whole_number(name: str, value, minimum: int, allow_none: bool = False):
    """``value`` as an int >= ``minimum`` (digits in a string count: lm-eval passes model args as
    text), or a ConfigError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def debug_enabled() -> bool:
    return os.environ.get("SEQEDIT_DEBUG", "").lower() not in ("", "0", "false", "no")
