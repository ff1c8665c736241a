"""Keys: the input of the edited MLP output projection at the subject's last token.

For each request the prompt is prefixed with every context template; the key is the mean over
templates within a group, then the mean over groups (MEMIT's weighting: the bare prompt counts as
much as all generated prefixes together). One forward pass serves every requested layer and stops
after the highest one.
"""

from __future__ import annotations

import torch

from harness.arch import Architecture, get_module
from harness.editors.hooks import capture, run_until
from harness.editors.tokens import right_padded, subject_last_index


def templated_prompts(tokenizer, requests, templates: list[list[str]]):
    """(texts, subject-last indices, request index, group index) for every request x template."""
    texts, idxs, owner, group = [], [], [], []
    for r, req in enumerate(requests):
        for g, grp in enumerate(templates):
            for t in grp:
                with_subject_slot = t.format(req.prompt)
                texts.append(with_subject_slot.format(req.subject))
                idxs.append(subject_last_index(tokenizer, with_subject_slot, req.subject))
                owner.append(r)
                group.append(g)
    return texts, idxs, owner, group


@torch.no_grad()
def read_at_subject(model, arch: Architecture, tokenizer, texts, idxs, layers, where: str,
                    batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Vectors at the given token positions, for each layer: ``where='key'`` reads the input of
    the MLP output projection, ``where='mlp'`` the output of the whole MLP (ROME's value),
    ``where='hidden'`` the block output (residual stream)."""
    if where == "key":
        names = {arch.mlp_out_name(layer): layer for layer in layers}
        kind = "input"
    elif where == "mlp":
        names = {arch.mlp_name(layer): layer for layer in layers}
        kind = "output"
    elif where == "hidden":
        names = {arch.layer_name(layer): layer for layer in layers}
        kind = "output"
    else:
        raise ValueError(f"where={where!r}: expected 'key', 'mlp' or 'hidden'")
    modules = {n: get_module(model, n) for n in names}
    top = max(layers)
    stop_name = next(n for n, layer in names.items() if layer == top)
    device = next(model.parameters()).device
    out = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        ids, mask = right_padded(tokenizer, texts[start:start + batch_size], device)
        rows = torch.arange(ids.shape[0], device=device)
        pos = torch.tensor(idxs[start:start + batch_size], device=device)
        with capture(modules, kind, stop_after=stop_name) as store:
            run_until(model, True, input_ids=ids, attention_mask=mask)
        for name, layer in names.items():
            out[layer].append(store[name][rows, pos].float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def compute_keys(model, arch, tokenizer, requests, layers, templates) -> dict[int, torch.Tensor]:
    """{layer: K} with K of shape (d_in, n_requests), float32."""
    texts, idxs, owner, group = templated_prompts(tokenizer, requests, templates)
    per_text = read_at_subject(model, arch, tokenizer, texts, idxs, layers, "key")
    owner_t = torch.tensor(owner)
    group_t = torch.tensor(group)
    n_groups = len(templates)
    keys = {}
    for layer, vecs in per_text.items():
        cols = []
        for r in range(len(requests)):
            means = [vecs[((owner_t == r) & (group_t == g)).to(vecs.device)].mean(0) for g in range(n_groups)]
            cols.append(torch.stack(means).mean(0))
        keys[layer] = torch.stack(cols, dim=1)
    return keys


def hidden_at_subject(model, arch, tokenizer, requests, layer: int) -> torch.Tensor:
    """Block output of ``layer`` at the subject's last token of each bare prompt: (n, d_model)."""
    texts = [r.prompt.format(r.subject) for r in requests]
    idxs = [subject_last_index(tokenizer, r.prompt, r.subject) for r in requests]
    return read_at_subject(model, arch, tokenizer, texts, idxs, [layer], "hidden")[layer]
