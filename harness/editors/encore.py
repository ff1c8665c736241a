"""ENCORE (Gupta et al., 2025): MEMIT_seq with a Frobenius-norm penalty and early-stopped targets.

Targets use MPES (most-probable early stopping, ``mpes_patience``): the optimisation of a
request's target value stops once every target token has been top-1 on the context-templated
prompts for that many iterations, which keeps target values (and so updates) from overshooting.
Per layer:
    Delta = R K^T (lam C0 + mu I + K_prev K_prev^T + K K^T)^-1
with lam = mom2_update_weight, mu = update_norm_lambda (the penalty mu ||Delta||_F^2) and K_prev
the keys of all earlier batches at this layer, as computed when they were written (the
reference's SEQ_CACHE).
"""

from harness.editors.base import Editor
from harness.editors.solvers import EditMemory, encore_delta


class ENCOREEditor(Editor):
    method = "encore"

    def prepare_state(self):
        if not hasattr(self, "memory"):
            self.memory = {layer: EditMemory(track_values=False, device=self.layer_devices[layer]) for layer in self.layers}

    def solve_layer(self, i, layer, W, K, R, requests):
        return encore_delta(R, K, self.C0[layer], self.hp.mom2_update_weight,
                            self.hp.update_norm_lambda, prev_KKt=self.memory[layer].S_KK)

    def after_layer(self, i, layer, W_new, K, preservation_loss_value):
        self.memory[layer].add(K)
        return {"memory_edits": self.memory[layer].n_edits}

    def extra_state(self):
        return {str(layer): m.state_dict() for layer, m in self.memory.items()}

    def load_extra_state(self, state):
        for layer, s in state.items():
            self.memory[int(layer)].load_state_dict(s)
