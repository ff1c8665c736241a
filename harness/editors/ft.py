"""FT: fine-tuning the MLP output projection of one layer on the edits (the "FT-L" baseline).

Adam (``ft_lr``, ``ft_weight_decay``) on the edited weight only, ``ft_steps`` epochs over the
batch in chunks of ``ft_batch_size`` requests; a chunk whose loss is already under 1e-2 is not
stepped and training stops once an epoch's mean loss is under 1e-2 (reference notes 1.1). After
every step each weight is clamped into ``[w_start - eps, w_start + eps]`` with ``w_start`` the
weight at the start of the batch (``ft_norm_constraint`` = eps, an L-infinity box; null trains
unconstrained). The box re-centres at every batch, as in the reference, so the total drift over a
stream is not bounded.

Loss (``ft_loss``), the mean over requests of a per-token mean NLL of ``" " + target_new`` (its
tokens as :func:`harness.editors.tokens.target_ids` gives them) after the bare prompt:

* ``last_position`` (default, the reference's): every target token is scored at the last prompt
  position, so a multi-token target trains the model to put each of its tokens first;
* ``teacher_forced``: target token j is scored after the prompt and target tokens < j, the
  likelihood CounterFact's efficacy and ZsRE's accuracy measure. It is the better-posed objective
  for multi-token targets, but it is not what the published FT rows trained, so it is an option.

The reference tokenizes the targets with the tokenizer's special tokens, which on Llama-3 puts a
BOS among the scored tokens; we score only the target's own tokens. Only the weight is trained (the
reference also trains the GPT-2/GPT-J projection bias): the weight is the state every editor saves
and restores.

The trained layer is ``ft_layer`` when set, otherwise the (single-entry, as in every shipped
config) ``layers`` list; a longer list is trained jointly. Key statistics C0 are not needed for
training; they are loaded so that the preservation loss D_t is logged as for every other editor.
"""

from __future__ import annotations

import math
import time

import torch

from harness.arch import edit_module, edit_weight, get_module
from harness.editors.base import Editor
from harness.editors.guard import NonFiniteUpdateError, checked_weight
from harness.editors.hooks import StopForward
from harness.editors.solvers import preservation_loss
from harness.editors.tokens import right_padded, target_ids
from harness.placement import is_offloaded

LOSS_STOP = 1e-2  # the reference's "already learned" threshold


LOSSES = ("last_position", "teacher_forced")


class TargetBatch:
    """A right-padded batch of texts and, for each target token, the request and the position
    whose next-token distribution scores it: ``loss="last_position"`` (the reference's) scores all
    of them at the prompt's last token; ``"teacher_forced"`` runs ``prompt + target_new[:-1]`` and
    scores target token j after the tokens before it."""

    def __init__(self, tokenizer, requests, device, loss: str = "last_position"):
        if loss not in LOSSES:
            raise ValueError(f"ft_loss={loss!r} is not one of {list(LOSSES)}")
        texts, seq, pos, tok = [], [], [], []
        for r, req in enumerate(requests):
            tids = target_ids(tokenizer, req.target_new)
            if not tids:
                raise ValueError(f"request {req.case_id}: target_new {req.target_new!r} has no tokens")
            text = req.prompt.format(req.subject)
            if loss == "teacher_forced":
                text += tokenizer.decode(tids[:-1])
            n = len(tokenizer(text).input_ids)
            texts.append(text)
            # logits at position p predict token p + 1
            seq += [r] * len(tids)
            pos += range(n - len(tids), n) if loss == "teacher_forced" else [n - 1] * len(tids)
            tok += tids
        self.ids, self.mask = right_padded(tokenizer, texts, device)
        self.seq = torch.tensor(seq, device=device)
        self.pos = torch.tensor(pos, device=device)
        self.tok = torch.tensor(tok, device=device)
        self.n_tokens = torch.bincount(self.seq, minlength=len(requests)).float()

    def nll(self, model, arch, rows: list[int]) -> torch.Tensor:
        """Per-token mean NLL of the target of each request in ``rows`` (differentiable)."""
        rows_t = torch.tensor(rows, device=self.ids.device)
        pick = torch.isin(self.seq, rows_t)
        local = torch.full((int(self.seq.max()) + 1,), -1, device=self.ids.device)
        local[rows_t] = torch.arange(len(rows), device=self.ids.device)
        hidden = _final_hidden(model, arch, self.ids[rows_t], self.mask[rows_t])
        seq_local = local[self.seq[pick]]
        logits = get_module(model, arch.lm_head)(hidden[seq_local, self.pos[pick]]).float()
        tok_logp = torch.log_softmax(logits, -1).gather(1, self.tok[pick][:, None])[:, 0]
        per_req = torch.zeros(len(rows), device=logits.device).index_add(0, seq_local, -tok_logp)
        return per_req / self.n_tokens[rows_t]


def _final_hidden(model, arch, ids, mask) -> torch.Tensor:
    """Input of the unembedding (the final-norm output) for every position; the full-vocabulary
    logits are then computed only at the scored positions."""
    captured = {}

    def grab(module, args):
        captured["h"] = args[0]
        raise StopForward

    handle = get_module(model, arch.lm_head).register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


class FTEditor(Editor):
    method = "ft"
    uses_stats = True  # only for the logged preservation loss D_t

    def __init__(self, model, tokenizer, hparams, **kwargs):
        super().__init__(model, tokenizer, hparams, **kwargs)
        if hparams.ft_layer is not None:
            n = self.arch.n_layers(model.config)
            if not 0 <= int(hparams.ft_layer) < n:
                raise ValueError(f"ft_layer={hparams.ft_layer} does not exist: the model has {n} layers")
            self.layers = [int(hparams.ft_layer)]
        if hparams.ft_loss not in LOSSES:
            raise ValueError(f"ft_loss={hparams.ft_loss!r} is not one of {list(LOSSES)}")
        if hparams.ft_norm_constraint is not None and hparams.ft_norm_constraint < 0:
            raise ValueError(f"ft_norm_constraint must be >= 0 or null (unconstrained), got {hparams.ft_norm_constraint}")
        self.templates = [["{}"]]  # FT trains on the bare prompts: no context templates to generate
        self.place_layers()
        offloaded = [layer for layer in self.layers if is_offloaded(edit_module(model, self.arch, layer))]
        if offloaded:
            raise ValueError(f"FT trains the edited weights as parameters, and layers {offloaded} are offloaded by "
                             "device_map (their weights live outside the model between forward passes): keep the "
                             "edited blocks on a device in the device_map, or use a closed-form editor")

    def apply_batch(self, requests) -> dict:
        self.prepare()
        hp = self.hp
        t_start = time.perf_counter()
        params = [edit_weight(self.model, self.arch, layer) for layer in self.layers]
        starts = [p.detach().clone() for p in params]
        batch = TargetBatch(self.tokenizer, requests, self.device, hp.ft_loss)
        chunks = [list(range(s, min(s + hp.ft_batch_size, len(requests))))
                  for s in range(0, len(requests), hp.ft_batch_size)]
        opt = torch.optim.Adam(params, lr=hp.ft_lr, weight_decay=hp.ft_weight_decay)
        eps = hp.ft_norm_constraint
        grad_flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        steps = 0
        try:
            with torch.enable_grad():
                for _ in range(hp.ft_steps):
                    epoch_loss = 0.0
                    for rows in chunks:
                        loss = batch.nll(self.model, self.arch, rows).mean()
                        epoch_loss += float(loss.detach()) * len(rows)
                        if float(loss.detach()) < LOSS_STOP:
                            continue
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        steps += 1
                        if eps is not None:
                            with torch.no_grad():
                                for p, start in zip(params, starts):
                                    p.copy_(torch.maximum(torch.minimum(p, start + eps), start - eps))
                    if epoch_loss / len(requests) < LOSS_STOP:
                        break
        finally:
            for p, flag in zip(self.model.parameters(), grad_flags):
                p.requires_grad_(flag)
            opt.zero_grad(set_to_none=True)
        try:  # the trained weights are checked before the batch counts
            for layer, p, start in zip(self.layers, params, starts):
                checked_weight(self, layer, start, p.detach() - start, "fine-tuning update")
        except NonFiniteUpdateError:
            with torch.no_grad():
                for p, start in zip(params, starts):
                    p.copy_(start)
            raise
        train_seconds = time.perf_counter() - t_start
        with torch.no_grad():
            nll = batch.nll(self.model, self.arch, list(range(len(requests)))).tolist()
        layers_trace = {}
        for layer, p, start in zip(self.layers, params, starts):
            change = (p.detach() - start).float()
            entry = {"update_norm": float(change.norm()), "max_abs_change": float(change.abs().max())}
            if layer in self.C0:
                entry["preservation_loss"] = preservation_loss(self.weight(layer), self.W0[layer], self.C0[layer])
            layers_trace[str(layer)] = entry
        self.batches_done += 1
        self.edits_done += len(requests)
        return self.batch_record(requests, t_start, {"train": train_seconds}, nll,
                                 [math.exp(-x) for x in nll], [steps] * len(requests), layers_trace)
