"""PRUNE (Ma et al., 2024): sequential MEMIT whose accumulated update is shown restrained.

The official PRUNE keeps editing with plain MEMIT and restrains the accumulated update when the
edited model is used: with ``W_raw - W0 = U diag(s) V^T`` the weight becomes
``W0 + U diag(r(s)) V^T`` where ``r(s) = ln(s) - ln(sigma_max(W0)) + sigma_max(W0)`` for every
``s > sigma_max(W0)`` and ``r(s) = s`` otherwise (reference notes 1.4). So here:

* the edits run on the raw weights ``W_raw`` (before each batch they are put back in place), so
  the raw trajectory is exactly sequential MEMIT's;
* after each batch the model is given ``W0 + restrained(W_raw - W0)``; every evaluation therefore
  sees what the official code would load at that point of the stream. While no singular value of
  the accumulated update exceeds ``sigma_max(W0)`` the restraint is the identity and the raw
  weight is left in place untouched;
* the raw weights are part of the editor's state, so a resumed run continues the same stream.

The LL/AE baseline (``MEMIT_prune``) restrains once, after the last batch, and writes
``W_raw + restrained`` instead of ``W0 + restrained``, which adds the accumulated update a second
time; it is a bug (reference notes 1.4) and is not offered here.

The rule compresses only where ``sigma_max(W0) >= 1`` (its slope beyond the bound is ``1/s``),
which holds for the LLM weights it is meant for; on weights with a smaller spectral norm it would
enlarge large singular values.

The same restraint is LyapLock's ``base: prune`` add-on: LyapLock edits (queue, memory) on the raw
weights, and the model shows them restrained.
"""

from __future__ import annotations

import torch

from harness.editors.memit import MEMITEditor
from harness.editors.solvers import preservation_loss, prune_restrain_with_spectrum, spectral_norm


class PruneRestraint:
    """One editor's restraint: the bound ``sigma_max(W0)`` per layer and the raw edited weights
    while the model shows restrained ones."""

    def __init__(self, editor):
        self.editor = editor
        self.sigma_max = {layer: spectral_norm(W) for layer, W in editor.W0.items()}
        self.raw: dict[int, torch.Tensor] = {}  # only for layers whose shown weight differs

    def edit_on_raw(self) -> None:
        """Put the raw weights back, so the next batch continues the unrestrained MEMIT stream."""
        for layer, W_raw in self.raw.items():
            self.editor.set_weight(layer, W_raw)

    @torch.no_grad()
    def show_restrained(self, layers_trace: dict) -> None:
        """Replace each raw edited weight by ``W0 + restrained(W_raw - W0)`` and say in the
        layer's trace what the restraint saw and did (``preservation_loss``: of the shown weight;
        ``raw_preservation_loss``: of the raw weight the edits continue from)."""
        ed = self.editor
        self.raw = {}
        for layer in ed.layers:
            W_raw = ed.weight(layer).detach().clone()
            W0 = ed.W0[layer].to(torch.float64)
            restrained, top, n_big = prune_restrain_with_spectrum(
                W_raw.to(torch.float64) - W0, self.sigma_max[layer])
            entry = layers_trace.setdefault(str(layer), {})
            entry.update({"sigma_max_W0": self.sigma_max[layer], "update_sigma_max": top,
                          "compressed_singular_values": n_big, "restraint_change_norm": 0.0})
            if n_big == 0:
                continue
            shown = W0 + restrained
            ed.set_weight(layer, shown)
            self.raw[layer] = W_raw
            entry["restraint_change_norm"] = float((shown - W_raw.to(torch.float64)).norm())
            if "preservation_loss" in entry:
                entry["raw_preservation_loss"] = entry["preservation_loss"]
                entry["preservation_loss"] = preservation_loss(ed.weight(layer), ed.W0[layer], ed.C0[layer])

    def state_dict(self) -> dict:
        return {str(layer): W.detach().cpu().clone() for layer, W in self.raw.items()}

    def load_state_dict(self, state: dict) -> None:
        self.raw = {int(layer): W.to(self.editor.layer_devices[int(layer)], self.editor.weight(int(layer)).dtype)
                    for layer, W in state.items()}


class PRUNEEditor(MEMITEditor):
    method = "prune"

    def prepare_state(self):
        self.restraint = PruneRestraint(self)

    def before_batch(self):
        self.restraint.edit_on_raw()

    def present(self, layers_trace):
        self.restraint.show_restrained(layers_trace)

    def abort_batch(self):
        self.restraint.show_restrained({})  # the raw weights are back: show them as before

    def extra_state(self):
        return {"raw_weights": self.restraint.state_dict()}

    def load_extra_state(self, state):
        self.restraint.load_state_dict(state.get("raw_weights", {}))
