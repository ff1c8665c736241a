"""RECT (Gu et al., 2024): MEMIT whose update keeps only the entries with the largest relative change.

Per batch and layer the MEMIT update is computed, then only the top ``rect_keep_fraction`` of its
entries by ``|Delta_ij| / (|W_ij| + 1e-8)`` survive (default 0.4, as the LL/AE baseline; the
official RECT keeps 0.2). No memory across batches.

The sparsification happens inside the shared layer loop, before the update is written, so the
later layers of the batch see (and their residuals compensate for) the sparse update. The
reference sparsifies when applying the deltas, after all layers were solved with the dense ones.
The same step is LyapLock's ``base: rect`` add-on.
"""

from harness.editors.memit import MEMITEditor
from harness.editors.solvers import rect_sparsify


class RECTEditor(MEMITEditor):
    method = "rect"

    def solve_layer(self, i, layer, W, K, R, requests):
        delta = super().solve_layer(i, layer, W, K, R, requests)
        return rect_sparsify(delta, W, self.hp.rect_keep_fraction)
