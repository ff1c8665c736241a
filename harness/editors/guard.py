"""Nothing non-finite reaches a weight: every update is checked before it is written, and a
batch that fails leaves the edited weights as they were before it.

An edit can go wrong numerically (an infinite learning rate, a singular system, an overflow of
a half-precision weight). Written, NaN spreads to every later batch and every metric, and a
leaderboard would rank the resulting zeros. Here the batch stops with an error that names the
method, the batch, the layer and the cause, the weights are put back, and the driver has not
saved anything of the batch: the last good checkpoint stays the one to resume from.
"""

from __future__ import annotations

import torch


class NonFiniteUpdateError(FloatingPointError):
    """An edit produced NaN or Inf; nothing of its batch was kept."""


def _count_bad(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


def where(editor, layer: int | None = None) -> str:
    first = editor.edits_done
    text = f"{editor.name}: batch {editor.batches_done} (edits {first}+)"
    return text if layer is None else f"{text}, layer {layer}"


def check_target_values(editor, z_star: torch.Tensor, losses) -> None:
    bad = _count_bad(z_star)
    if bad:
        raise NonFiniteUpdateError(
            f"{where(editor)}: {bad} target-value entries (z*) are NaN/Inf (final target losses "
            f"{[round(float(x), 4) for x in losses][:5]}); check v_lr, v_num_grad_steps and "
            "clamp_norm_factor. Nothing of this batch was written.")


def checked_weight(editor, layer: int, W: torch.Tensor, delta: torch.Tensor, what: str = "update") -> torch.Tensor:
    """``W + delta`` in ``W``'s dtype, or an error naming what went wrong."""
    bad = _count_bad(delta)
    if bad:
        raise NonFiniteUpdateError(
            f"{where(editor, layer)}: the {what} has {bad} NaN/Inf entries (a singular or "
            "ill-conditioned solve, or non-finite inputs). Nothing of this batch was written.")
    W_new = W + delta.to(W.dtype)
    bad = _count_bad(W_new)
    if bad:
        raise NonFiniteUpdateError(
            f"{where(editor, layer)}: W + update overflows {W.dtype} in {bad} entries (largest "
            f"|update| {float(delta.abs().max()):.3g}); use dtype=float32 or a smaller update. "
            "Nothing of this batch was written.")
    return W_new
