"""Context templates: short generated prefixes that make keys and target values robust.

As MEMIT does: the first group is the bare prompt "{}", then for each (max_length, count) group,
``count`` continuations sampled (top-k 5) from the prefixes "The", "Therefore", "Because", "I",
"You" in turn, each capped at ``max_length`` tokens in total, braces removed, ". {}" appended.
Generated with a private torch.Generator so they depend only on the model and the seed; they are
part of the editor's state (saved for resume) rather than a module-level cache.
"""

from __future__ import annotations

import torch

from harness.placement import input_device

PREFIXES = ["The", "Therefore", "Because", "I", "You"]


@torch.no_grad()
def sample_top_k(model, tokenizer, prompts: list[str], max_length: int, top_k: int = 5,
                 generator: torch.Generator | None = None) -> list[str]:
    """Top-k sampling until each text holds ``max_length`` tokens in total (prompt included),
    one token per step for all prompts at once (left-padded so every row ends at the same step)."""
    device = input_device(model)
    enc = [tokenizer(p).input_ids for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    lengths = [len(e) for e in enc]
    steps = max(0, max_length - min(lengths))
    out = [list(e) for e in enc]
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(top_k, dim=-1)
        choice = torch.multinomial(top_p.cpu(), 1, generator=generator).to(device)
        nxt = top_i.gather(-1, choice)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        for row, token in enumerate(nxt[:, 0].tolist()):
            if len(out[row]) < max_length:
                out[row].append(token)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def generate_context_templates(model, tokenizer, spec: list[list[int]], seed: int = 0) -> list[list[str]]:
    generator = torch.Generator().manual_seed(seed)
    groups = [["{}"]]
    for max_length, count in spec:
        prompts = [PREFIXES[i % len(PREFIXES)] for i in range(count)]
        texts = sample_top_k(model, tokenizer, prompts, max_length, generator=generator)
        groups.append([t.replace("{", " ").replace("}", " ") + ". {}" for t in texts])
    return groups
