"""ROME (Meng et al., 2022): one rank-one update of one MLP output projection per fact.

Requests are edited one at a time, each on the model left by the previous one (ROME edits a
single fact; "sequential ROME" repeats it), also inside a batch. For a request:
* key k*: the input of the projection at the subject's last token, averaged over the bare prompt
  and ROME's 20 generated context prefixes (``context_templates: [[5, 10], [10, 10]]``, one flat
  mean over the 21 templates, as ROME's compute_u); k_clean, the same on the bare prompt alone;
* direction u = C0^-1 k* / ||C0^-1 k*|| (C0 the key second moment, "mom2_adjustment");
* value v* = m_init + delta, where m_init is the MLP output at the subject's last token of the bare
  prompt and delta is optimised by the shared target-value code. That code adds delta to the block
  output; in these architectures the MLP output enters the residual stream additively at the same
  position (pre-norm blocks, sequential as in Llama/GPT-2 or parallel as in GPT-J), so adding it
  to the block output is adding it to the MLP output. ROME clamps ||delta|| and scales its weight
  decay relative to ||m_init|| rather than the block output's norm: the factors are rescaled by
  ||m_init|| / ||h_init|| for that request;
* update W += ((v* - m_init) / (k_clean . u)) u^T (:func:`harness.editors.solvers.rome_update`),
  so that the edited projection maps k_clean to v*.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import torch

from harness.editors.base import Editor
from harness.editors.guard import check_target_values, checked_weight
from harness.editors.keys import compute_keys, read_at_subject
from harness.editors.solvers import preservation_loss, rome_update
from harness.editors.targets import compute_target_values
from harness.editors.tokens import subject_last_index


class ROMEEditor(Editor):
    method = "rome"

    def __init__(self, model, tokenizer, hparams, **kwargs):
        super().__init__(model, tokenizer, hparams, **kwargs)
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer; got layers={self.layers} (e.g. layers=[5])")

    def prepare_state(self):
        # ROME weighs every template equally: one group
        self.templates = [[t for group in self.templates for t in group]]

    def apply_batch(self, requests) -> dict:
        self.prepare()
        layer = self.layers[0]
        t_start = time.perf_counter()
        phases = defaultdict(float)
        W_start = self.weight(layer).detach().clone()
        edits_before = self.edits_done
        try:
            return self._edit_requests(requests, layer, W_start, t_start, phases)
        except BaseException:
            with torch.no_grad():
                self.set_weight(layer, W_start)
            self.edits_done = edits_before
            raise

    def _edit_requests(self, requests, layer, W_start, t_start, phases) -> dict:
        losses, target_probs, steps, norms = [], [], [], []
        for req in requests:
            t0 = time.perf_counter()
            k_star = compute_keys(self.model, self.arch, self.tokenizer, [req], [layer], self.templates)[layer][:, 0]
            bare = ([req.prompt.format(req.subject)], [subject_last_index(self.tokenizer, req.prompt, req.subject)])
            k_clean, m_init, h_init = (
                read_at_subject(self.model, self.arch, self.tokenizer, *bare, [layer], where)[layer][0]
                for where in ("key", "mlp", "hidden"))
            phases["keys"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ratio = float(m_init.norm() / h_init.norm())
            hp = replace(self.hp, clamp_norm_factor=self.hp.clamp_norm_factor * ratio,
                         v_weight_decay=self.hp.v_weight_decay / ratio**2)
            tv = compute_target_values(self.model, self.arch, self.tokenizer, [req], layer, self.templates, hp)
            check_target_values(self, tv.z_star, tv.loss)
            phases["targets"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            change = (tv.z_star - tv.z_init)[0]
            if self.arch.mlp_out_norm:
                change = self.through_output_norm(layer, change[:, None], m_init[None, :])[:, 0]
            v_star = m_init + change
            W = self.weight(layer).detach()
            delta = rome_update(W, self.C0.get(layer), k_star, k_clean, v_star, w_k_clean=m_init)
            self.set_weight(layer, checked_weight(self, layer, W, delta, f"rank-one update of case {req.case_id}"))
            phases["solve"] += time.perf_counter() - t0
            losses += tv.loss
            target_probs += tv.target_prob
            steps += tv.steps
            norms.append(float(delta.float().norm()))
            self.edits_done += 1
        W_end = self.weight(layer).detach()
        entry = {"update_norm": float((W_end - W_start).float().norm()), "request_update_norms": norms}
        if layer in self.C0:
            entry["preservation_loss"] = preservation_loss(W_end, self.W0[layer], self.C0[layer])
        self.batches_done += 1
        return self.batch_record(requests, t_start, phases, losses, target_probs, steps, {str(layer): entry})
