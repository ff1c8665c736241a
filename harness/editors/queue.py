"""LyapLock's virtual queue (paper Sec. 4; reference notes 1.8), one per edited layer.

The queue turns the long-term constraint "average preservation loss <= threshold" into a
per-batch weight. After each batch the layer's distortion ``D_t`` (see
:func:`harness.editors.solvers.preservation_loss`) is observed and

    Z <- max(Z + a (D_t - alpha D_base) + b, Z_floor)

where ``D_base`` is the distortion after the first batch and ``alpha D_base`` the threshold
(the paper's ``Z_max`` is this floor). The next solve weighs the preservation term by
``q = a Z`` (:func:`harness.editors.solvers.lyaplock_delta`). With the defaults
(``a = 1/sqrt(alpha D_base)``, ``Z0 = Z_floor = sqrt(alpha D_base)``) this reads
``q <- max(q + (D_t - alpha D_base) / (alpha D_base), 1)``: ``q`` starts at 1, grows by the
relative excess of the distortion over the threshold and never drops below 1.

Plain floats only (no torch), so the state is JSON-serialisable.
"""

from __future__ import annotations

import math
import re

__all__ = ["LyapunovQueue", "resolve_scale"]

# "<c>sqrtD" = c sqrt(alpha D_base), "<c>_sqrtD" = c / sqrt(alpha D_base),
# "<c>D" = c alpha D_base, "<c>_D" = c / (alpha D_base); <c> is an optional number (default 1).
_SCALE_SPEC = re.compile(r"^(?P<c>[0-9.eE+-]*)(?P<inverse>_?)(?P<base>sqrtD|D)$")
_SPEC_HELP = (
    "a number, or one of '<c>sqrtD' (c*sqrt(alpha*D_base)), '<c>_sqrtD' (c/sqrt(alpha*D_base)), "
    "'<c>D' (c*alpha*D_base), '<c>_D' (c/(alpha*D_base)) with <c> an optional number such as "
    "'1sqrtD', '1_sqrtD', 'D', '1_D', '2sqrtD'"
)


def _parse(spec: float | int | str, name: str) -> tuple[float, bool, str | None]:
    """(coefficient, inverse, base) with base None for a literal number."""
    if isinstance(spec, bool):
        raise ValueError(f"{name}={spec!r}: expected {_SPEC_HELP}")
    if isinstance(spec, (int, float)):
        return float(spec), False, None
    text = str(spec).strip()
    try:
        return float(text), False, None
    except ValueError:
        pass
    match = _SCALE_SPEC.match(text)
    if match is None:
        raise ValueError(f"{name}={spec!r} is not understood: expected {_SPEC_HELP}")
    try:
        coefficient = float(match["c"]) if match["c"] else 1.0
    except ValueError:
        raise ValueError(f"{name}={spec!r}: bad coefficient; expected {_SPEC_HELP}") from None
    return coefficient, bool(match["inverse"]), match["base"]


def resolve_scale(spec: float | int | str, threshold: float, name: str = "value") -> float:
    """Value of a queue setting given the threshold ``alpha * D_base`` (see module docstring)."""
    coefficient, inverse, base = _parse(spec, name)
    if base is None:
        return coefficient
    scale = math.sqrt(threshold) if base == "sqrtD" else threshold
    return coefficient / scale if inverse else coefficient * scale


class LyapunovQueue:
    """Virtual queue of one layer: ``Z``, its step ``a``, offset ``b``, floor and penalty ``V``.

    ``z0``, ``a`` and ``z_floor`` are numbers or spellings relative to the threshold
    ``alpha * D_base`` (``'1sqrtD'``, ``'1_sqrtD'``, ``'D'``, ``'1_D'``, ``'<c>sqrtD'``, ...),
    resolved at the first :meth:`observe`.
    """

    def __init__(
        self,
        alpha: float = 60.0,
        V: float = 1.0,
        b: float = 0.0,
        z0: float | str = "1sqrtD",
        a: float | str = "1_sqrtD",
        z_floor: float | str = "1sqrtD",
    ):
        if alpha <= 0:
            raise ValueError(f"alpha (threshold = alpha * D_base) must be > 0, got {alpha}")
        for name, spec in (("z0", z0), ("a", a), ("z_floor", z_floor)):
            _parse(spec, name)  # fail at construction, not after the first batch
        self.alpha, self.V, self.b = float(alpha), float(V), float(b)
        self.specs = {"z0": z0, "a": a, "z_floor": z_floor}
        self.D_base: float | None = None
        self.a: float | None = None
        self.Z: float | None = None
        self.Z_floor: float | None = None
        self.last_D: float | None = None
        self.steps = 0

    @property
    def started(self) -> bool:
        return self.D_base is not None

    @property
    def threshold(self) -> float | None:
        """``alpha * D_base``: the long-term bound on the distortion (None before the first batch)."""
        return None if self.D_base is None else self.alpha * self.D_base

    @property
    def q(self) -> float:
        """Weight of the preservation term in the next solve: ``a Z`` (1 before the first batch)."""
        return 1.0 if self.a is None else self.a * self.Z

    @property
    def edit_weight(self) -> float:
        """``V`` for the next solve; 1 before the first batch.

        The reference's first batch is a plain MEMIT-with-anchor solve (``V = q = 1``).
        """
        return 1.0 if self.a is None else self.V

    def observe(self, D_t: float) -> float:
        """Account for the distortion ``D_t`` measured after a batch; returns the new ``q``."""
        D_t = float(D_t)
        if not math.isfinite(D_t):
            raise ValueError(f"distortion must be finite, got {D_t} (check the layer update)")
        if self.D_base is None:
            if D_t <= 0 and any(_parse(s, n)[2] for n, s in self.specs.items()):
                raise ValueError(
                    f"the first batch's distortion D_base={D_t} must be > 0 to scale the queue "
                    f"(the first edit did not change the layer); or give z0, a and z_floor as numbers"
                )
            self.D_base = D_t
            threshold = self.alpha * D_t
            self.a = resolve_scale(self.specs["a"], threshold, "a")
            self.Z = resolve_scale(self.specs["z0"], threshold, "z0")
            self.Z_floor = resolve_scale(self.specs["z_floor"], threshold, "z_floor")
        self.Z = max(self.Z + self.a * (D_t - self.alpha * self.D_base) + self.b, self.Z_floor)
        self.last_D = D_t
        self.steps += 1
        return self.q

    def state_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "V": self.V,
            "b": self.b,
            "specs": dict(self.specs),
            "D_base": self.D_base,
            "a": self.a,
            "Z": self.Z,
            "Z_floor": self.Z_floor,
            "last_D": self.last_D,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"alpha", "V", "b", "specs", "D_base", "a", "Z", "Z_floor"} - set(state)
        if missing:
            raise ValueError(f"LyapunovQueue state is missing {sorted(missing)}")

        def opt(x):
            return None if x is None else float(x)

        self.alpha, self.V, self.b = float(state["alpha"]), float(state["V"]), float(state["b"])
        self.specs = dict(state["specs"])
        self.D_base, self.a = opt(state["D_base"]), opt(state["a"])
        self.Z, self.Z_floor = opt(state["Z"]), opt(state["Z_floor"])
        self.last_D = opt(state.get("last_D"))
        self.steps = int(state.get("steps", 0))

    @classmethod
    def from_state_dict(cls, state: dict) -> LyapunovQueue:
        queue = cls()
        queue.load_state_dict(state)
        return queue
