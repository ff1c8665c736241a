"""Target values: the hidden state at the last edit layer that makes the model say target_new.

For each request a free vector delta is added to the block output of ``layer`` at the subject's
last token of every context-templated prompt (teacher-forced on target_new) and of the essence
prompt "{subject} is a". Adam minimises
    NLL(target_new | templated prompts) + kl_factor * KL(p_now || p_before) on the essence prompt
    + v_weight_decay * ||delta|| / ||z_init||^2
with ||delta|| clamped to clamp_norm_factor * ||z_init|| after each step, stopping when a
request's loss falls under ``v_early_stop_loss`` (or, with ``mpes_patience``, after that many
iterations in which every target token is already top-1: ENCORE's MPES).

Efficiency, which is where editing time goes:
* all requests of a batch are optimised together: their deltas are independent rows of one
  parameter, the loss is a sum of per-request losses, and Adam is element-wise, so this is exactly
  the one-request-at-a-time optimisation, with one batched forward per step;
* the layers up to ``layer`` run once: their output and the arguments the next block receives
  are cached, and each step only runs the blocks above;
* and in those blocks only the tokens from the subject's last token on: the tokens before it do
  not see delta, so their keys/values are computed once (a KV cache of the prompt prefix, left
  padded so every prefix ends in the same column) and each step runs the few suffix tokens
  (subject end, rest of the prompt, target) against that cache. For a SmolLM2 batch this cuts the
  tokens per step about five-fold. Models whose blocks do not take a cache fall back to full
  sequences (same numbers, slower);
* the suffixes are grouped by length and each group runs unpadded with its own slice of the
  cache: suffixes span 2-6 tokens, so padding every one to the longest wasted about 40% of the
  upper blocks' work;
* a request stops at its own early-stop loss, as the reference's one-request loop does; once a
  quarter of the requests still running have stopped, their sequences leave the upper blocks
  (each group keeps its prefix cache rows for the others and re-runs their few suffix tokens up
  to the edit layer for the arguments the blocks receive), so later steps cost only the requests
  still moving;
* the essence prompt ("{subject} is a") is read only at the subject's last token, so it ends
  there;
* requests are optimised ``v_batch_size`` at a time, which bounds the activations kept for the
  backward pass at large edit batches.
The last three change no result beyond float round-off (``fast=False`` turns the first two off;
tests/test_engine.py compares them).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from harness.arch import Architecture, get_module
from harness.editors.hooks import StopForward
from harness.editors.tokens import right_padded, subject_last_index, target_ids
from harness.placement import execution_device

log = logging.getLogger(__name__)


@dataclass
class TargetValues:
    z_star: torch.Tensor  # (n, d_model)
    z_init: torch.Tensor  # (n, d_model)
    loss: list[float]  # final total loss per request
    nll: list[float]
    steps: list[int]
    target_prob: list[float]  # exp(-nll) at the end
    prefix_cached: bool = False  # whether the suffix-only fast path ran


def _build(tokenizer, requests, templates):
    """Sequences, their owner request, subject-last index and target positions."""
    flat_templates = [t for grp in templates for t in grp]
    texts, owner, lookup, tgt_pos, tgt_tok, is_kl, is_bare = [], [], [], [], [], [], []
    for r, req in enumerate(requests):
        tids = target_ids(tokenizer, req.target_new)
        if not tids:
            raise ValueError(f"request {req.case_id}: target_new {req.target_new!r} has no tokens")
        teacher = tokenizer.decode(tids[:-1])
        for j, t in enumerate(flat_templates):
            slot = t.format(req.prompt)
            text = slot.format(req.subject) + teacher
            n_tokens = len(tokenizer(text).input_ids)
            texts.append(text)
            owner.append(r)
            lookup.append(subject_last_index(tokenizer, slot, req.subject))
            # logits at position p predict token p + 1
            tgt_pos.append(list(range(n_tokens - len(tids), n_tokens)))
            tgt_tok.append(tids)
            is_kl.append(False)
            is_bare.append(j == 0)
        kl_slot = "{} is a"
        texts.append(kl_slot.format(req.subject))
        owner.append(r)
        lookup.append(subject_last_index(tokenizer, kl_slot, req.subject))
        tgt_pos.append([])
        tgt_tok.append([])
        is_kl.append(True)
        is_bare.append(False)
    return texts, owner, lookup, tgt_pos, tgt_tok, is_kl, is_bare


class _Group:
    """Sequences that run through the upper blocks together: their rows in the batch, their
    length, the arguments block ``layer + 1`` received for them and their prefix KV cache."""

    def __init__(self, rows: torch.Tensor | None, length: int | None):
        self.rows = rows  # None: every row
        self.length = length  # None: the full padded width
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.cache = None
        self.prefix_kv = None
        # for narrowing the group to some of its rows: the left-padded prefix mask and positions
        # of the suffixes, and the suffix ids (all batch-first)
        self.pre_mask = None
        self.suf_pos = None
        self.suf_ids = None


class _UpperStack:
    """Runs the blocks above ``layer`` from a cached block output."""

    def __init__(self, model, arch: Architecture, layer: int, loss_layer: int):
        self.blocks = [get_module(model, arch.layer_name(i)) for i in range(layer + 1, loss_layer + 1)]
        self.norm = get_module(model, arch.final_norm)
        self.head = get_module(model, arch.lm_head)
        self.groups: list[_Group] = []
        self.inverse: torch.Tensor | None = None  # position of each batch row among the groups' rows

    @property
    def prefix_cached(self) -> bool:
        return any(g.cache is not None for g in self.groups)

    def _run_group(self, group: _Group, hidden: torch.Tensor) -> torch.Tensor:
        if group.cache is not None:
            _restore_cache(group.cache, group.prefix_kv)  # drop the previous step's suffix keys/values
        for block in self.blocks:
            out = block(hidden, *group.args, **group.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last upper block's output, on ``hidden``'s device (the blocks may sit on others)."""
        if len(self.groups) == 1 and self.groups[0].rows is None:
            return self._run_group(self.groups[0], hidden).to(hidden.device)
        width = hidden.shape[1]
        outs = [torch.nn.functional.pad(self._run_group(g, hidden[g.rows, :g.length]).to(hidden.device),
                                        (0, 0, 0, width - g.length))
                for g in self.groups]
        if self.inverse is not None:
            # back to batch order; the columns past a group's length are padding nobody reads
            return torch.cat(outs).index_select(0, self.inverse)
        # narrowed groups: rows of finished requests are left at zero (their loss is not used)
        rows = torch.cat([g.rows for g in self.groups])
        return hidden.new_zeros(hidden.shape).index_copy(0, rows, torch.cat(outs))

    def narrow(self, model, arch, layer: int, keep_rows: torch.Tensor) -> None:
        """Run only the sequences in ``keep_rows`` from now on. Each group keeps its prefix cache
        rows for them and re-runs their few suffix tokens up to the edit layer, which gives the
        arguments the upper blocks receive for that subset (masks, positions)."""
        wanted = torch.zeros(int(max(int(g.rows.max()) for g in self.groups)) + 1, dtype=torch.bool,
                             device=keep_rows.device)
        wanted[keep_rows[keep_rows < len(wanted)]] = True
        groups = []
        for g in self.groups:
            local = wanted[g.rows].nonzero()[:, 0]
            if len(local) == 0:
                continue
            if len(local) == len(g.rows):
                groups.append(g)
                continue
            groups.append(_narrowed_group(model, arch, layer, self, g, local))
        self.groups = groups
        self.inverse = None

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_rows)).to(hidden_rows.device)


@torch.no_grad()
def _run_to_layer(model, arch, layer, upper: _UpperStack, group: _Group, **inputs):
    """Block ``layer`` output, recording in ``group`` the arguments block ``layer + 1`` receives
    and stopping the forward pass there."""
    captured = {}
    block = get_module(model, arch.layer_name(layer))

    def grab_output(module, args, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        if not upper.blocks:
            raise StopForward

    def grab_next_args(module, args, kwargs):
        group.args = tuple(args[1:])
        group.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    handles = [block.register_forward_hook(grab_output)]
    if upper.blocks:
        handles.append(upper.blocks[0].register_forward_pre_hook(grab_next_args, with_kwargs=True))
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["h"]


def _prefix_pass(model, arch, layer, upper: _UpperStack, ids, mask):
    group = _Group(None, None)
    upper.groups = [group]
    return _run_to_layer(model, arch, layer, upper, group, input_ids=ids, attention_mask=mask, use_cache=False)


@torch.no_grad()
def _suffix_pass(model, arch, layer, upper: _UpperStack, tokenizer, texts, lookup, device):
    """Prefix KV caches + block ``layer`` output on the suffixes, one group per suffix length;
    None when the model's blocks do not support it."""
    enc = [tokenizer(t).input_ids for t in texts]
    prefixes = [e[:p] for e, p in zip(enc, lookup)]
    suffixes = [e[p:] for e, p in zip(enc, lookup)]
    width = max(len(x) for x in suffixes)
    # a sequence whose subject ends on its first token (a bare prompt that starts with a one-token
    # subject, in a tokenizer without BOS) has no prefix to cache: such sequences form groups of
    # their own that run whole, so that they do not send the whole chunk down the slow path
    by_length: dict[tuple[int, bool], list[int]] = {}
    for row, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        by_length.setdefault((len(suffix), bool(prefix)), []).append(row)
    h_layer = None
    groups = []
    for (length, has_prefix), rows in sorted(by_length.items()):
        group = _Group(torch.tensor(rows, device=device), length)
        if has_prefix:
            h = _group_suffix_pass(model, arch, layer, upper, group, tokenizer.pad_token_id,
                                   [prefixes[r] for r in rows], [suffixes[r] for r in rows], device)
        else:
            h = _group_whole_pass(model, arch, layer, upper, group,
                                  torch.tensor([suffixes[r] for r in rows], device=device))
        if h is None:
            return None
        if h_layer is None:
            h_layer = h.new_zeros(len(texts), width, h.shape[-1])
        h_layer[group.rows, :length] = h
        groups.append(group)
    upper.groups = groups
    order = torch.cat([g.rows for g in groups])
    upper.inverse = torch.empty_like(order)
    upper.inverse[order] = torch.arange(len(order), device=device)
    return h_layer


def _group_suffix_pass(model, arch, layer, upper, group: _Group, pad, prefixes, suffixes, device):
    P = max(len(x) for x in prefixes)
    S = group.length
    pre_ids = torch.tensor([[pad] * (P - len(x)) + x for x in prefixes], device=device)
    pre_mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in prefixes], device=device)
    suf_ids = torch.tensor(suffixes, device=device)
    suf_mask = torch.ones_like(suf_ids)
    pre_pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
    suf_pos = torch.tensor([len(x) for x in prefixes], device=device)[:, None] + torch.arange(S, device=device)
    cache = _new_cache(model)
    # the prefix only fills the cache: the base model, without the head's logits for every position
    base = getattr(model, "base_model", model)
    base(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, **_cache_kwargs(base, cache))
    prefix_kv = _snapshot_cache(cache)
    if prefix_kv is None or cache.get_seq_length() != P:
        return None
    h = _run_to_layer(model, arch, layer, upper, group, input_ids=suf_ids,
                      attention_mask=torch.cat([pre_mask, suf_mask], 1), position_ids=suf_pos,
                      **_cache_kwargs(model, cache))
    group.cache = cache
    group.prefix_kv = prefix_kv
    group.pre_mask, group.suf_pos, group.suf_ids = pre_mask, suf_pos, suf_ids
    return h


def _group_whole_pass(model, arch, layer, upper, group: _Group, ids: torch.Tensor):
    group.suf_ids = ids
    return _run_to_layer(model, arch, layer, upper, group, input_ids=group.suf_ids,
                         attention_mask=torch.ones_like(group.suf_ids), use_cache=False)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _narrowed_group(model, arch, layer, upper, group: _Group, local: torch.Tensor) -> _Group:
    """``group`` restricted to its rows ``local``: their slice of the prefix cache, and their suffix
    run again up to the edit layer (cheap: a few tokens through the lower blocks)."""
    narrowed = _Group(group.rows[local], group.length)
    if group.cache is None:
        _group_whole_pass(model, arch, layer, upper, narrowed, group.suf_ids[local])
        return narrowed
    cache = _new_cache(model)
    for i, (k, v) in enumerate(group.prefix_kv):
        cache.update(k[local], v[local], i)
    prefix_kv = _snapshot_cache(cache)
    pre_mask = group.pre_mask[local]
    suf_ids = group.suf_ids[local]
    _run_to_layer(model, arch, layer, upper, narrowed, input_ids=suf_ids,
                  attention_mask=torch.cat([pre_mask, torch.ones_like(suf_ids)], 1),
                  position_ids=group.suf_pos[local], **_cache_kwargs(model, cache))
    narrowed.cache, narrowed.prefix_kv = cache, prefix_kv
    narrowed.pre_mask, narrowed.suf_pos, narrowed.suf_ids = pre_mask, group.suf_pos[local], suf_ids
    return narrowed


def _cache_kwargs(model, cache) -> dict:
    # transformers 5.x takes the cache as ``cache`` (``past_key_values`` warns that it is going
    # away); 4.x knows only ``past_key_values``
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}


def _snapshot_cache(cache):
    """Per-layer (keys, values) tensors of a transformers DynamicCache (v5 ``layers`` or the
    older ``key_cache``/``value_cache`` lists); None for a cache we do not know how to rewind."""
    if hasattr(cache, "layers") and all(hasattr(x, "keys") for x in cache.layers):
        return [(x.keys, x.values) for x in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def _restore_cache(cache, kv) -> None:
    if hasattr(cache, "layers") and all(hasattr(x, "keys") for x in cache.layers):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]


@dataclass
class _Problem:
    """The sequences of a chunk of requests, run up to the edit layer and ready for the
    optimisation loop: the upper stack with its cached inputs and every index the loss needs."""

    n_req: int
    upper: _UpperStack
    h_layer: torch.Tensor
    owner: torch.Tensor
    lookup: torch.Tensor
    nll_seq: torch.Tensor
    nll_pos: torch.Tensor
    nll_tok: torch.Tensor
    kl_seq: torch.Tensor
    rewrite_seq: torch.Tensor
    n_rewrite_per_req: torch.Tensor
    tgt_len: torch.Tensor
    bare_seq: torch.Tensor
    mpes_rows: torch.Tensor


def _prepare(model, arch, tokenizer, requests, layer, loss_layer, templates, use_prefix_cache,
             device, trim_essence: bool = True) -> _Problem:
    texts, owner, lookup, tgt_pos, tgt_tok, is_kl, is_bare = _build(tokenizer, requests, templates)
    # the KL term reads only the subject's last token, which sees nothing after it: the essence
    # prompts are cut there (their other tokens were computed and never read)
    for s in range(len(texts)):
        if is_kl[s] and trim_essence:
            ids = tokenizer(texts[s]).input_ids[: lookup[s] + 1]
            cut = tokenizer.decode(ids, skip_special_tokens=True)
            if tokenizer(cut).input_ids == ids:  # else (it re-tokenises otherwise) it stays whole
                texts[s] = cut
    upper = _UpperStack(model, arch, layer, loss_layer)
    h_layer = None
    if use_prefix_cache:
        try:
            h_layer = _suffix_pass(model, arch, layer, upper, tokenizer, texts, lookup, device)
        except (TypeError, AttributeError, ValueError, RuntimeError) as exc:
            log.debug("prefix cache not usable for %s (%r): full sequences", arch.name, exc)
            h_layer = None
    if h_layer is not None:
        # suffix coordinates: the subject's last token is column 0 of every sequence
        tgt_pos = [[p - lk for p in pos] for pos, lk in zip(tgt_pos, lookup)]
        lookup = [0] * len(lookup)
    else:
        upper = _UpperStack(model, arch, layer, loss_layer)
        ids, mask = right_padded(tokenizer, texts, device)
        h_layer = _prefix_pass(model, arch, layer, upper, ids, mask)
    n_seq = h_layer.shape[0]
    owner_t = torch.tensor(owner, device=device)
    nll_seq, nll_pos, nll_tok = [], [], []
    for s, (pos, tok) in enumerate(zip(tgt_pos, tgt_tok)):
        nll_seq += [s] * len(pos)
        nll_pos += pos
        nll_tok += tok
    rewrite_seq = torch.tensor([s for s in range(n_seq) if not is_kl[s]], device=device)
    return _Problem(
        n_req=len(requests), upper=upper, h_layer=h_layer, owner=owner_t,
        lookup=torch.tensor(lookup, device=device),
        nll_seq=torch.tensor(nll_seq, device=device), nll_pos=torch.tensor(nll_pos, device=device),
        nll_tok=torch.tensor(nll_tok, device=device),
        kl_seq=torch.tensor([s for s in range(n_seq) if is_kl[s]], device=device),
        rewrite_seq=rewrite_seq,
        n_rewrite_per_req=torch.bincount(owner_t[rewrite_seq], minlength=len(requests)).float(),
        tgt_len=torch.tensor([len(tgt_tok[s]) for s in range(n_seq)], device=device).float(),
        bare_seq=torch.tensor([s for s in range(n_seq) if is_bare[s]], device=device),
        # MPES checks the templated prompts other than the bare one
        mpes_rows=torch.tensor([not is_bare[s] for s in nll_seq], device=device),
    )


# When this share of the requests still running has stopped, their sequences leave the upper
# blocks: each later step then costs only the active ones.
COMPACT_WHEN_DONE = 0.25


def compute_target_values(model, arch: Architecture, tokenizer, requests, layer: int,
                          templates: list[list[str]], hp, use_prefix_cache: bool = True,
                          fast: bool = True) -> TargetValues:
    """z* for every request. Requests are optimised ``hp.v_batch_size`` at a time (their deltas
    are independent, so this bounds memory without changing a result). ``fast``: requests that
    stopped early leave the computation, and the essence prompts end at the subject; the same
    numbers as ``fast=False`` to float round-off (tested)."""
    chunk = hp.v_batch_size or len(requests)
    parts = [_target_values_chunk(model, arch, tokenizer, requests[s:s + chunk], layer, templates, hp,
                                  use_prefix_cache, fast)
             for s in range(0, len(requests), chunk)]
    if len(parts) == 1:
        return parts[0]
    return TargetValues(
        z_star=torch.cat([p.z_star for p in parts]), z_init=torch.cat([p.z_init for p in parts]),
        loss=[x for p in parts for x in p.loss], nll=[x for p in parts for x in p.nll],
        steps=[x for p in parts for x in p.steps], target_prob=[x for p in parts for x in p.target_prob],
        prefix_cached=all(p.prefix_cached for p in parts))


def _target_values_chunk(model, arch, tokenizer, requests, layer, templates, hp, use_prefix_cache,
                         fast) -> TargetValues:
    # the optimisation runs where the edit layer computes
    device = execution_device(get_module(model, arch.layer_name(layer)))
    n_layers = arch.n_layers(model.config)
    loss_layer = n_layers - 1 if hp.v_loss_layer is None else min(int(hp.v_loss_layer), n_layers - 1)
    n_req = len(requests)

    prob = _prepare(model, arch, tokenizer, requests, layer, loss_layer, templates, use_prefix_cache, device,
                    trim_essence=fast)
    prefix_cached = prob.upper.prefix_cached
    d_model = prob.h_layer.shape[-1]
    h_layer = prob.h_layer
    n_seq = h_layer.shape[0]
    z_init = h_layer[prob.bare_seq, prob.lookup[prob.bare_seq]].float()  # (n_req, d)
    max_norm = hp.clamp_norm_factor * z_init.norm(dim=1)
    delta = torch.zeros(n_req, d_model, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = [0] * n_req
    mpes_count = torch.zeros(n_req, device=device)
    kl_init = None
    final_loss = torch.zeros(n_req, device=device)
    final_nll = torch.zeros(n_req, device=device)
    params_frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    running = n_req  # requests whose sequences still run through the upper blocks
    try:
        for it in range(hp.v_num_grad_steps):
            placed = torch.zeros(n_seq, h_layer.shape[1], d_model, device=device, dtype=h_layer.dtype)
            placed = placed.index_put((torch.arange(n_seq, device=device), prob.lookup),
                                      delta[prob.owner].to(h_layer.dtype))
            top = prob.upper.run(h_layer + placed)
            logp = torch.log_softmax(prob.upper.logits(top[prob.nll_seq, prob.nll_pos]).float(), dim=-1)
            tok_logp = logp.gather(1, prob.nll_tok[:, None])[:, 0]
            seq_logp = torch.zeros(n_seq, device=device).index_add(0, prob.nll_seq, tok_logp)
            seq_nll = -seq_logp / prob.tgt_len.clamp(min=1)
            req_nll = torch.zeros(n_req, device=device).index_add(
                0, prob.owner[prob.rewrite_seq], seq_nll[prob.rewrite_seq]) / prob.n_rewrite_per_req
            kl_logp = torch.log_softmax(
                prob.upper.logits(top[prob.kl_seq, prob.lookup[prob.kl_seq]]).float(), dim=-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            req_kl = torch.zeros(n_req, device=device).index_add(0, prob.owner[prob.kl_seq], kl)
            wd = hp.v_weight_decay * delta.norm(dim=1) / z_init.norm(dim=1) ** 2
            loss = req_nll + hp.kl_factor * req_kl + wd
            with torch.no_grad():
                final_loss = torch.where(active, loss.detach(), final_loss)
                final_nll = torch.where(active, req_nll.detach(), final_nll)
                done = active & (loss.detach() < hp.v_early_stop_loss)
                if hp.mpes_patience:
                    greedy = (logp.argmax(-1) == prob.nll_tok) | ~prob.mpes_rows
                    # a request counts when none of its scored target tokens misses the argmax
                    seq_misses = torch.zeros(n_seq, device=device).index_add(0, prob.nll_seq, (~greedy).float())
                    req_top1 = torch.zeros(n_req, device=device).index_add(0, prob.owner, seq_misses) == 0
                    mpes_count += (req_top1 & active).float()
                    done |= active & (mpes_count >= abs(hp.mpes_patience))
                active &= ~done
            if not bool(active.any()) or it == hp.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            (loss * active).sum().backward()
            frozen = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = frozen[~active]
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
            for r in range(n_req):
                if bool(active[r]):
                    steps[r] = it + 1
            finished = running - int(active.sum())
            if fast and finished >= max(1, COMPACT_WHEN_DONE * running) and it < hp.v_num_grad_steps - 2 \
                    and prob.upper.prefix_cached:
                # the finished requests' sequences leave the upper blocks (their rows stay in the
                # tensors, at zero, and their loss is masked as before)
                keep_seq = active[prob.owner].nonzero()[:, 0]
                prob.upper.narrow(model, arch, layer, keep_seq)
                running = int(active.sum())
    finally:
        for p, req_grad in zip(model.parameters(), params_frozen):
            p.requires_grad_(req_grad)
    z_star = (z_init + delta.detach()).float()
    return TargetValues(
        z_star=z_star, z_init=z_init,
        loss=final_loss.tolist(), nll=final_nll.tolist(), steps=steps,
        target_prob=torch.exp(-final_nll).tolist(),
        prefix_cached=prefix_cached,
    )
