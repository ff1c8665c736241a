"""PRUNE (Ma et al., 2024): MEMIT whose accumulated update has its large singular values restrained.

The update accumulated so far, ``W - W0 = U diag(s) V^T``, is rebuilt with every singular value
``s > sigma_max(W0)`` replaced by ``ln(s) - ln(sigma_max(W0)) + sigma_max(W0)`` and the layer set
to ``W0 + restrained`` (the official PRUNE rule; the LL/AE baseline adds the restrained update to
the already edited weight instead, reference notes 1.4). The rule compresses only where
``sigma_max(W0) >= 1`` (its slope beyond the bound is ``1/s``), which holds for the LLM weights
it is meant for; on weights with a smaller spectral norm it would enlarge large singular values.

When (``prune_every``): the reference restrains once, after the last batch, so its intermediate
evaluations see raw MEMIT. A sequential harness evaluated every N edits does not know which batch
is the last, so by default (``prune_every: 1``) the restraint follows every batch and every
evaluation sees a restrained model; later batches are then edited on the restrained weights.
``prune_every: k`` restrains after every k-th batch only; k = (number of edits / batch size)
reproduces the reference's single restraint, with raw MEMIT at the checkpoints before it.

Where: right after each layer's MEMIT update, inside the shared layer loop, so the residual left
for the later layers of the batch accounts for what the restraint removed, and the logged
preservation loss D_t is that of the weight the model really has. (The reference restrains after
all layers were solved.) The same restraint is LyapLock's ``base: prune`` add-on.
"""

from __future__ import annotations

import torch

from harness.editors.memit import MEMITEditor
from harness.editors.solvers import prune_restrain_with_spectrum, spectral_norm


class PruneRestraint:
    """The restraint of one editor: the bound ``sigma_max(W0)`` per layer and its schedule."""

    def __init__(self, W0: dict[int, torch.Tensor], every: int = 1):
        if int(every) < 1:
            raise ValueError(f"prune_every must be >= 1 (restrain after every k-th batch), got {every}")
        self.every = int(every)
        self.W0 = W0
        self.sigma_max = {layer: spectral_norm(W) for layer, W in W0.items()}
        self.seen: dict[int, dict] = {}  # per layer, what the latest restraint saw (for the trace)

    def due(self, batch_index: int) -> bool:
        """Whether the batch with this 0-based index ends with a restraint."""
        return (batch_index + 1) % self.every == 0

    def restrained_update(self, layer: int, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The update that takes ``W`` to ``W0 + restrained(W + delta - W0)`` (``delta``'s dtype)."""
        W0 = self.W0[layer].to(torch.float64)
        W64 = W.to(torch.float64)
        total = W64 + delta.to(torch.float64) - W0
        restrained, top, n_big = prune_restrain_with_spectrum(total, self.sigma_max[layer])
        self.seen[layer] = {"update_sigma_max": top, "compressed_singular_values": n_big}
        return (W0 + restrained - W64).to(delta.dtype)

    def trace(self, layer: int, batch_index: int) -> dict:
        """Per-layer trace fields: whether this batch ended with a restraint, the bound, and (when
        it did) the accumulated update's largest singular value and how many were compressed."""
        due = self.due(batch_index)
        out = {"restrained": due, "sigma_max_W0": self.sigma_max[layer]}
        if due and layer in self.seen:
            out.update(self.seen[layer])
        return out


class PRUNEEditor(MEMITEditor):
    method = "prune"

    def prepare_state(self):
        self.restraint = PruneRestraint(self.W0, self.hp.prune_every)

    def solve_layer(self, i, layer, W, K, R, requests):
        delta = super().solve_layer(i, layer, W, K, R, requests)
        if self.restraint.due(self.batches_done):
            delta = self.restraint.restrained_update(layer, W, delta)
        return delta

    def after_layer(self, i, layer, W_new, K, preservation_loss_value):
        return self.restraint.trace(layer, self.batches_done)
