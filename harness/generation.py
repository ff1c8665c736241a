"""The reference's fluency sampler (ROME's ``generate_fast``), batched with a KV cache.

The reference samples each generation prompt with top-k 5 from the full softmax, never stops at
the end-of-text token, and fills a right-padded batch until it is ``total_tokens`` wide, each
prompt writing its next token after its own last one: so every prompt ends with exactly
``total_tokens`` tokens, its own length included. We run the same sampling over left-padded
batches sorted by length with a KV cache, one new column per step.

Each prompt draws from its own generator, seeded from one number taken from torch's global
generator (which lm-eval seeds) plus the prompt's position among the requests: the texts depend on
the seed and not on the batch size or on the order the batches run in.

lm-eval reaches it through ``generate_until`` requests whose generation kwargs carry
``total_tokens`` (``counterfact_edit_generation``); other requests take lm-eval's own path.
"""

from __future__ import annotations

import torch

from harness.placement import input_device

TOTAL_TOKENS_KEY = "total_tokens"
SAMPLER_MIN_BATCH = 64


def left_padded(rows, width: int, pad_id: int, device):
    """(ids, attention mask) of token-id rows padded on the left to ``width``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if len(row):
            ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def sample_to_total_length(model, prompts: list[list[int]], total_tokens: int, top_k: int,
                           pad_token_id: int, seeds: list[int], batch_size: int = 16,
                           progress=None) -> list[list[int]]:
    """New token ids for every prompt (token-id lists), ``total_tokens - len(prompt)`` each
    (none for a prompt already that long)."""
    device = input_device(model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted((i for i, p in enumerate(prompts) if len(p) < total_tokens),
                   key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids, mask = left_padded([prompts[i] for i in rows], width, pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device="cpu").manual_seed(seeds[i]) for i in rows]
        wanted = [total_tokens - len(prompts[i]) for i in rows]
        result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, next_position = result.past_key_values, positions[:, -1:] + 1
        for step in range(max(wanted)):
            probs = torch.softmax(result.logits[:, -1, :].float(), dim=-1).cpu()
            top_probs, top_ids = probs.topk(top_k, dim=-1)
            chosen = torch.stack([
                top_ids[r, torch.multinomial(top_probs[r], 1, generator=generators[r])]
                for r in range(len(rows))
            ])
            for r, i in enumerate(rows):
                if step < wanted[r]:
                    out[i].append(int(chosen[r]))
            if progress is not None:
                progress(sum(1 for w in wanted if w == step + 1))
            if step + 1 == max(wanted):
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            result = model(input_ids=chosen.to(device), attention_mask=mask,
                           position_ids=next_position, past_key_values=cache, use_cache=True)
            cache, next_position = result.past_key_values, next_position + 1
    return out


def generate_until(lm, requests, fallback, disable_tqdm: bool = False) -> list[str]:
    """lm-eval's ``generate_until`` for an HFLM ``lm``: requests whose generation kwargs carry
    ``total_tokens`` are sampled here, the rest go to ``fallback(requests)``."""
    ours = [k for k, req in enumerate(requests) if TOTAL_TOKENS_KEY in req.args[1]]
    if not ours:
        return fallback(requests, disable_tqdm)
    mine = set(ours)
    others = [k for k in range(len(requests)) if k not in mine]
    answers: list[str | None] = [None] * len(requests)
    if others:
        for k, text in zip(others, fallback([requests[k] for k in others], disable_tqdm)):
            answers[k] = text
    from tqdm.auto import tqdm

    base_seed = int(torch.randint(0, 2**62, (1,)).item())
    groups: dict[tuple, list[int]] = {}
    for k in ours:
        kwargs = requests[k].args[1]
        unsupported = set(kwargs) - {TOTAL_TOKENS_KEY, "until", "do_sample", "top_k", "top_p",
                                     "temperature", "max_gen_toks"}
        if unsupported or kwargs.get("until") or float(kwargs.get("top_p", 1.0)) != 1.0 \
                or float(kwargs.get("temperature", 1.0)) != 1.0 or not kwargs.get("do_sample", True):
            raise ValueError(
                f"the {TOTAL_TOKENS_KEY} sampler is the reference's top-k sampler at temperature 1 "
                f"without stop sequences; it cannot honour {kwargs}")
        groups.setdefault((int(kwargs[TOTAL_TOKENS_KEY]), int(kwargs.get("top_k", 5))), []).append(k)
    # the sequences are at most total_tokens long, so the cache of a wide batch is small while
    # each step's cost is mostly per-layer overhead: batch wider than lm-eval's scoring batches
    batch_size = max(lm.batch_size if isinstance(lm.batch_size, int) else 1, SAMPLER_MIN_BATCH)
    bar = tqdm(total=len(ours), desc="Sampling to total length", disable=disable_tqdm)
    for (total, top_k), members in groups.items():
        prompt_ids = [lm.tok_encode(requests[k].args[0]) for k in members]
        new_ids = sample_to_total_length(
            lm.model, prompt_ids, total, top_k,
            pad_token_id=lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0,
            seeds=[(base_seed + k) % 2**63 for k in members], batch_size=batch_size,
            progress=bar.update)
        for k, prompt, new in zip(members, prompt_ids, new_ids):
            answers[k] = _continuation_text(lm.tokenizer, prompt, new)
            lm.cache_hook.add_partial("generate_until", requests[k].args, answers[k])
        bar.update(sum(1 for p in prompt_ids if len(p) >= total))
    bar.close()
    return answers


def _continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The reference decodes prompt and generation together (special tokens kept; the metric
    strips the end-of-text marker): the text after the decoded prompt."""
    whole = tokenizer.decode(prompt + new, skip_special_tokens=False)
    head = tokenizer.decode(prompt, skip_special_tokens=False)
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(new, skip_special_tokens=False)


def install(hflm_class) -> None:
    """Route ``total_tokens`` requests of every HFLM (lm-eval's ``hf`` model included) here."""
    original = hflm_class.generate_until
    if getattr(original, "_harness_patched", False):
        return

    def patched(self, requests, disable_tqdm: bool = False):
        return generate_until(self, requests, lambda reqs, quiet: original(self, reqs, quiet),
                              disable_tqdm)

    patched._harness_patched = True
    patched.__wrapped__ = original
    hflm_class.generate_until = patched
