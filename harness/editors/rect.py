"""RECT (Gu et al., 2024): MEMIT whose update keeps only the entries with the largest relative change.

Per batch and layer the MEMIT update is computed, then only the top ``rect_keep_fraction`` of its
entries by ``|Delta_ij| / (|W_ij| + 1e-8)`` survive (default 0.4, as the LL/AE baseline; the
official RECT keeps 0.2). No memory across batches.

As the reference: every layer of the batch is solved with the dense MEMIT updates of the layers
before it in place (their residuals see the dense updates), and the updates are sparsified when
they are finally written, after the last layer (``finish_update``). The same step is LyapLock's
``base: rect`` add-on, whose queue and memory see the sparse weight.
"""

from harness.editors.memit import MEMITEditor
from harness.editors.solvers import rect_sparsify


class RECTEditor(MEMITEditor):
    method = "rect"

    def finish_update(self, layer, W, delta):
        return rect_sparsify(delta, W, self.hp.rect_keep_fraction)
