"""LyapLock (arXiv 2505.15702, Eqs. 6-13, Algorithm 1): sequential editing as a long-term
constrained problem.

Per layer, each batch solves in closed form
    min_W'  V * (||W' K - (W K + R)||^2 + sum_prev ||W' k_p - v_p||^2) + q * lambda * D(W')
where D(W') = tr((W' - W0) C0 (W' - W0)^T) is the preservation loss (mean squared change of the
layer's output on generic text) and q = a * Z comes from a virtual queue that grows while D_t
exceeds the threshold alpha * D_base:  Z <- max(Z + a (D_t - alpha D_base) + b, Z_floor).
D_base is the preservation loss after the first batch, which is solved as plain MEMIT (q = V = 1,
no memory). With the defaults a = 1 / sqrt(alpha D_base) and Z0 = Z_floor = sqrt(alpha D_base), so
q starts at 1 and exceeding the threshold by one fold doubles the preservation weight.

LyapLock as an add-on (hparams ``base``, e.g. ``--model_args base=alphaedit``): the queue and the
memory stay as above, the per-layer step changes.
* ``memit``: the step above (the paper's method; editor name ``lyaplock``).
* ``prune``: the steps edit the raw weights as above (queue and memory see them); between
  batches the model shows PRUNE's restraint of the accumulated update ``W' - W0`` (singular
  values above sigma_max(W0) compressed logarithmically; see :mod:`harness.editors.prune`).
* ``rect``: the step's update sparsified as RECT does (top ``rect_keep_fraction`` entries by
  relative change, once every layer of the batch was solved densely; :mod:`harness.editors.rect`).
* ``alphaedit``: the step restricted to AlphaEdit's null space of the generic keys: minimise the
  objective above plus AlphaEdit's ``l2 ||Delta||^2`` over updates with ``Delta = Delta P``, which
  gives ``Delta = left P (A P + l2 I)^-1`` with LyapLock's normal equations ``Delta A = left``
  (derivation in :func:`harness.editors.solvers.lyaplock_nullspace_delta`). The update leaves
  every generic-key direction (range of ``I - P``) untouched, as AlphaEdit's does.
For ``rect`` and ``alphaedit`` the preservation loss, the queue and the memory of stored values
see the weight actually written (for ``prune``, the raw weight the stream continues from; the
trace gives both preservation losses), and the editor is named ``lyaplock-<base>`` (traces and run directories tell
them apart).
"""

from harness.editors.base import Editor
from harness.editors.prune import PruneRestraint
from harness.editors.queue import LyapunovQueue
from harness.editors.solvers import (
    EditMemory,
    lyaplock_delta,
    lyaplock_nullspace_delta,
    nullspace_projector,
    rect_sparsify,
)

BASES = ("memit", "prune", "rect", "alphaedit")


class LyapLockEditor(Editor):
    method = "lyaplock"

    def __init__(self, model, tokenizer, hparams, **kwargs):
        if hparams.base not in BASES:
            raise ValueError(f"LyapLock base={hparams.base!r} is not supported; use one of {list(BASES)}")
        super().__init__(model, tokenizer, hparams, **kwargs)

    @property
    def name(self) -> str:
        return self.method if self.hp.base == "memit" else f"{self.method}-{self.hp.base}"

    def prepare_state(self):
        hp = self.hp
        if hp.base == "prune":
            self.restraint = PruneRestraint(self)
        if hp.base == "alphaedit":
            self.projectors = {layer: nullspace_projector(self.C0[layer], hp.nullspace_threshold)
                               for layer in self.layers}
        if hasattr(self, "queues"):
            return
        self.queues = {
            layer: LyapunovQueue(alpha=hp.alpha, V=hp.lyapunov_v, b=hp.queue_b, z0=hp.queue_z0,
                                 a=hp.queue_a, z_floor=hp.queue_floor)
            for layer in self.layers
        }
        self.memory = {layer: EditMemory(track_values=True, device=self.layer_devices[layer]) for layer in self.layers}

    def solve_layer(self, i, layer, W, K, R, requests):
        queue, memory, hp = self.queues[layer], self.memory[layer], self.hp
        args = (R, K, W, self.W0[layer], self.C0[layer], hp.mom2_update_weight, queue.q)
        memo = dict(V=queue.edit_weight, S_VK=memory.S_VK, S_KK=memory.S_KK)
        if hp.base == "alphaedit":
            return lyaplock_nullspace_delta(*args, P=self.projectors[layer], l2=hp.l2, **memo)
        return lyaplock_delta(*args, **memo)

    def finish_update(self, layer, W, delta):
        if self.hp.base == "rect":  # after every layer was solved densely, as RECT
            return rect_sparsify(delta, W, self.hp.rect_keep_fraction)
        return delta

    def after_layer(self, i, layer, W_new, K, preservation_loss_value):
        queue = self.queues[layer]
        q_used = queue.q
        queue.observe(preservation_loss_value)
        self.memory[layer].add(K, W_new)
        out = {"threshold": queue.threshold, "queue": queue.Z, "q": q_used, "q_next": queue.q,
               "D_base": queue.D_base}
        return out

    def before_batch(self):
        if self.hp.base == "prune":
            self.restraint.edit_on_raw()

    def present(self, layers_trace):
        if self.hp.base == "prune":
            self.restraint.show_restrained(layers_trace)

    def abort_batch(self):
        if self.hp.base == "prune":
            self.restraint.show_restrained({})

    def after_batch(self, requests):
        if self.hp.base == "alphaedit":
            return {"nullspace_dim": {str(layer): int(round(float(P.trace())))
                                      for layer, P in self.projectors.items()}}
        return None

    def extra_state(self):
        state = {str(layer): {"queue": self.queues[layer].state_dict(), "memory": self.memory[layer].state_dict()}
                 for layer in self.layers}
        if self.hp.base == "prune":
            state["prune_raw_weights"] = self.restraint.state_dict()
        return state

    def load_extra_state(self, state):
        state = dict(state)
        if self.hp.base == "prune":
            self.restraint.load_state_dict(state.pop("prune_raw_weights", {}))
        for layer, s in state.items():
            self.queues[int(layer)].load_state_dict(s["queue"])
            self.memory[int(layer)].load_state_dict(s["memory"])
