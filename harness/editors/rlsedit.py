"""RLSEdit: recursive least squares over the whole edit stream, one state per edited layer.

After batches 1..t the layer holds the minimiser of
    sum_s ||W K_s - V_s||^2 + lambda_reg^2 ||W - W0||^2 + mu_reg^2 lam tr((W - W0) C0 (W - W0)^T)
(every edit so far at its target value, a pull toward the pre-trained weights and the anchor on
generic keys; lam = mom2_update_weight), and the inverse of its Hessian. Each batch is a Woodbury
correction of that inverse (:class:`harness.editors.solvers.RLSState`), so a batch costs
O(d_in^2 n) however many edits came before; the state is one d_in x d_in matrix per layer.

The batch's target values at a layer are ``V = W K + R``: the current outputs of its keys plus
the residual MEMIT's spreading assigns to the layer. The first batch is exactly MEMIT.

Differences from the authors' code at 6688b89 (reference notes 1.9), where the innovation uses
the raw residual and the inverse restarts from its prior every batch: we follow the paper's
recursion, in which both the inverse and the cumulative solution persist across batches.
"""

from harness.editors.base import Editor
from harness.editors.solvers import RLSState


class RLSEditEditor(Editor):
    method = "rlsedit"

    def prepare_state(self):
        if hasattr(self, "rls"):
            return
        hp = self.hp
        self.rls = {layer: RLSState(self.W0[layer], self.C0[layer], hp.mom2_update_weight,
                                    lambda_reg=hp.lambda_reg, mu_reg=hp.mu_reg)
                    for layer in self.layers}

    def solve_layer(self, i, layer, W, K, R, requests):
        W64 = W.double()
        return self.rls[layer].update(K, W64 @ K.to(W64) + R.to(W64))

    def after_layer(self, i, layer, W_new, K, preservation_loss_value):
        return {"rls_edits": self.rls[layer].n_edits}

    def extra_state(self):
        return {str(layer): state.state_dict() for layer, state in self.rls.items()}

    def load_extra_state(self, state):
        for layer, s in state.items():
            self.rls[int(layer)].load_state_dict(s)
