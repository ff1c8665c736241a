"""lm-eval's log-likelihood requests, scored without recomputing what requests share.

lm-eval's HFLM runs every (context, continuation) pair as its own padded row of eight and takes
the vocabulary logits at every position. The editing tasks are made of requests that overlap:
a ZsRE answer of T tokens is T requests, each the previous one plus a token; a CounterFact
prompt is scored with two objects, an edit_glue item with each answer word after one long
prompt. Here, for the same numbers:

* a request whose tokens are a prefix of another request's tokens is read from the longer
  one's pass (a causal model's logits at a position depend only on the tokens up to it);
* the tokens before the first position whose logits any request needs form a *prefix*; the
  rows that share one are run through the model once, and their *suffixes* run on its
  key/value cache in rounds, the cache cut back to the prefix after each;
* the head and the log-softmax are computed only at the suffix positions;
* rows are sorted by length and batched by a token budget instead of a fixed row count.

A model with sliding-window layers (Gemma 3) runs a sequence as long as its window whole, without
a shared prefix: such a layer forgets what leaves the window, so its cache cannot be cut back.

Each answer is HFLM's: the summed log-probability of the continuation's tokens under
``log_softmax`` of the logits, and whether every one of them is the argmax. Left padding with an
attention mask and explicit positions keeps each row's arithmetic its own; the values agree
with HFLM's to float round-off (tests/test_scoring.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.generation import left_padded
from harness.placement import input_device

# rows x width of one stage-2 batch: its logits take this many x vocabulary floats
# (prefix rows x width near 2,048 tokens is where 2 CPU cores run a 135M model fastest)
SUFFIX_TOKENS_PER_BATCH = 1024
PREFIX_TOKENS_PER_BATCH = 2048
MAX_ROWS = 128
MAX_PADDING_FACTOR = 1.5  # padded tokens of a batch per real token (rows x widest prefix + suffix)


@dataclass
class _Carrier:
    """One token sequence that is run; the requests it answers read windows of it."""

    tokens: tuple[int, ...]
    first: int = 10**9  # first position whose logits a request needs
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (request, start, stop)


@dataclass
class _Group:
    prefix: tuple[int, ...]
    carriers: list[_Carrier]


def _carriers(sequences: Sequence[tuple[int, ...]], firsts: Sequence[int]) -> list[_Carrier]:
    """Assign each request to the longest sequence its tokens are a prefix of."""
    unique = sorted(set(sequences))
    carrier_of: dict[tuple[int, ...], tuple[int, ...]] = {}
    for k in range(len(unique) - 1, -1, -1):
        seq = unique[k]
        nxt = unique[k + 1] if k + 1 < len(unique) else None
        # in lexicographic order, every sequence that extends seq directly follows it
        if nxt is not None and nxt[:len(seq)] == seq:
            carrier_of[seq] = carrier_of[nxt]
        else:
            carrier_of[seq] = seq
    carriers: dict[tuple[int, ...], _Carrier] = {}
    for i, (seq, first) in enumerate(zip(sequences, firsts)):
        carrier = carriers.setdefault(carrier_of[seq], _Carrier(carrier_of[seq]))
        carrier.first = min(carrier.first, first)
        carrier.members.append((i, first, len(seq) - 1))
    return list(carriers.values())


def _groups(carriers: list[_Carrier]) -> list[_Group]:
    by_prefix: dict[tuple[int, ...], list[_Carrier]] = {}
    for c in carriers:
        by_prefix.setdefault(c.tokens[:c.first], []).append(c)
    return [_Group(prefix, members) for prefix, members in by_prefix.items()]


def _batches(groups: list[_Group]) -> list[list[_Group]]:
    """Groups packed under the token budgets, sorted so that a batch pads little: by the
    power of two above their suffix width (a few long answers do not widen every row), then by
    prefix length. A group whose prefix is empty never shares a batch with one whose prefix is
    not (it has no cache to extend)."""
    groups = sorted(groups, key=lambda g: (len(g.prefix) == 0, -_suffix_width(g).bit_length(),
                                           -len(g.prefix), -_suffix_width(g)))
    batches: list[list[_Group]] = []
    current: list[_Group] = []
    prefix_width = suffix_width = real_tokens = 0
    for g in groups:
        new_prefix = max(prefix_width, len(g.prefix))
        new_suffix = max(suffix_width, _suffix_width(g))
        rows = len(current) + 1
        real = real_tokens + len(g.prefix) + _suffix_width(g)
        fits = (current and (len(current[0].prefix) == 0) == (len(g.prefix) == 0)
                and rows <= MAX_ROWS
                and rows * new_suffix <= SUFFIX_TOKENS_PER_BATCH
                and rows * new_prefix <= PREFIX_TOKENS_PER_BATCH
                and rows * (new_prefix + new_suffix) <= MAX_PADDING_FACTOR * real)
        if current and not fits:
            batches.append(current)
            current, new_prefix, new_suffix = [], len(g.prefix), _suffix_width(g)
            real = len(g.prefix) + _suffix_width(g)
        current.append(g)
        prefix_width, suffix_width, real_tokens = new_prefix, new_suffix, real
    if current:
        batches.append(current)
    return batches


def _suffix_width(group: _Group) -> int:
    return max(len(c.tokens) - 1 - c.first for c in group.carriers)


@torch.inference_mode()
def _run_batch(model, batch: list[_Group], pad_id: int, device):
    """Yields (carrier, log-probability of each next token, whether it is the argmax, offset of
    the carrier's first needed position) for every carrier of the batch's groups.

    The prefixes run once, one row per group. The suffixes then run in rounds, round k taking
    the k-th carrier of every group (a group with fewer repeats its last one, whose result is
    dropped) on top of the prefix cache, which is cut back to the prefixes after each round:
    the cache is never copied."""
    cache, prefix_mask = None, None
    if batch[0].prefix:
        width = max(len(g.prefix) for g in batch)
        ids, prefix_mask = left_padded([g.prefix for g in batch], width, pad_id, device)
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values
    prefix_lengths = prefix_mask.sum(-1) if prefix_mask is not None else None
    for k in range(max(len(g.carriers) for g in batch)):
        carriers = [g.carriers[min(k, len(g.carriers) - 1)] for g in batch]
        suffixes = [c.tokens[c.first:-1] for c in carriers]
        width = max(len(s) for s in suffixes)
        ids, mask = left_padded(suffixes, width, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if cache is not None:
            positions = positions + prefix_lengths[:, None]
            mask = torch.cat([prefix_mask, mask], dim=-1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=cache is not None, logits_to_keep=width)
        if cache is not None:
            cache.crop(-width)  # drop this round's suffix
        logprobs = F.log_softmax(out.logits[:, -width:, :].float(), dim=-1)
        targets = torch.zeros((len(carriers), width), dtype=torch.long, device=device)
        for r, c in enumerate(carriers):
            targets[r, width - len(suffixes[r]):] = torch.tensor(c.tokens[c.first + 1:], dtype=torch.long)
        chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        greedy = (logprobs.argmax(-1) == targets).cpu()
        for r, g in enumerate(batch):
            if k < len(g.carriers):
                yield carriers[r], chosen[r], greedy[r], width - len(suffixes[r])


def sliding_window(model) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma 3, Mistral); None if
    every layer attends to the whole sequence."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
          progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, every continuation token is the argmax) for
    each (context tokens, continuation tokens) pair, as lm-eval's HFLM defines them."""
    if not requests:
        return []
    device = input_device(model)
    sequences = [tuple(ctx) + tuple(cont) for ctx, cont in requests]
    firsts = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        firsts.append(len(ctx) - 1)
    carriers = _carriers(sequences, firsts)
    window = sliding_window(model)
    if window is not None:
        for c in carriers:
            if len(c.tokens) >= window:
                # a sliding-window layer drops what falls out of its window, so a cache cut back
                # after a round could not be restored: such a sequence runs whole, without a prefix
                c.first = 0
    answers: list[tuple[float, bool] | None] = [None] * len(requests)
    for batch in _batches(_groups(carriers)):
        for carrier, chosen, greedy, offset in _run_batch(model, batch, pad_id, device):
            for i, start, stop in carrier.members:
                # positions start..stop-1 of the carrier predict the request's continuation
                lo, hi = offset + start - carrier.first, offset + stop - carrier.first
                answers[i] = (float(chosen[lo:hi].sum()), bool(greedy[lo:hi].all()))
            if progress is not None:
                progress(len(carrier.members))
    return answers  # type: ignore[return-value]


def loglikelihood_tokens(lm, requests, fallback, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """HFLM's ``_loglikelihood_tokens`` for a causal ``lm``: the requests that fit the model's
    context go through :func:`score`; the rare longer ones HFLM truncates from the left, so they
    go to ``fallback(requests)``, HFLM's own path."""
    from tqdm.auto import tqdm

    limit = lm.max_length + 1
    fits = [k for k, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) <= limit]
    long = [k for k in range(len(requests)) if len(requests[k][1]) + len(requests[k][2]) > limit]
    answers: list = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="Running loglikelihood requests", disable=disable_tqdm)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    scored = score(lm.model, [(requests[k][1], requests[k][2]) for k in fits], pad_id, progress=bar.update)
    for k, answer in zip(fits, scored):
        answers[k] = answer
        if requests[k][0] is not None:
            lm.cache_hook.add_partial("loglikelihood", requests[k][0], answer)
    if long:
        for k, answer in zip(long, fallback([requests[k] for k in long])):
            answers[k] = answer
        bar.update(len(long))
    bar.close()
    return answers
