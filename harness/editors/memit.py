"""MEMIT: Delta = R K^T (lambda C0 + K K^T)^-1 on the current weights, no memory of earlier batches."""

from harness.editors.base import Editor
from harness.editors.solvers import memit_delta


class MEMITEditor(Editor):
    method = "memit"

    def solve_layer(self, i, layer, W, K, R, requests):
        return memit_delta(R, K, self.C0[layer], self.hp.mom2_update_weight)
