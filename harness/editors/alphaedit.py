"""AlphaEdit: the MEMIT residual projected onto the null space of the generic keys.

Delta = R K^T P ((Kp Kp^T + K K^T) P + L2 I)^-1, P the projector onto the eigenvectors of C0 with
eigenvalue under ``nullspace_threshold`` (computed once per layer, at preparation, from the
cached statistics), Kp the keys of all earlier edits, recomputed on the model after each batch.
"""

from harness.editors.base import Editor
from harness.editors.keys import compute_keys
from harness.editors.solvers import EditMemory, alphaedit_delta, nullspace_projector


class AlphaEditEditor(Editor):
    method = "alphaedit"

    def prepare_state(self):
        self.projectors = {layer: nullspace_projector(self.C0[layer], self.hp.nullspace_threshold)
                           for layer in self.layers}
        if not hasattr(self, "memory"):
            self.memory = {layer: EditMemory(track_values=False, device=self.layer_devices[layer]) for layer in self.layers}

    def solve_layer(self, i, layer, W, K, R, requests):
        return alphaedit_delta(R, K, self.projectors[layer], self.memory[layer].S_KK, self.hp.l2)

    def after_batch(self, requests):
        # the reference recomputes the keys of the batch on the fully edited model
        keys = compute_keys(self.model, self.arch, self.tokenizer, requests, self.layers, self.templates)
        for layer, K in keys.items():
            self.memory[layer].add(K)
        return {"nullspace_dim": {str(layer): int(round(float(P.trace()))) for layer, P in self.projectors.items()}}

    def extra_state(self):
        return {str(layer): m.state_dict() for layer, m in self.memory.items()}

    def load_extra_state(self, state):
        for layer, s in state.items():
            self.memory[int(layer)].load_state_dict(s)
