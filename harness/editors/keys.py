"""Keys: the input of the edited MLP output projection at the subject's last token.

For each request the prompt is prefixed with every context template; the key is the mean over
templates within a group, then the mean over groups (MEMIT's weighting: the bare prompt counts as
much as all generated prefixes together). One forward pass serves every requested layer and stops
after the highest one.
"""

from __future__ import annotations

import torch

from harness.arch import Architecture, get_module
from harness.editors.hooks import StopForward, capture, run_until
from harness.editors.tokens import right_padded, subject_last_index
from harness.placement import input_device


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
    device = input_device(model)
    out = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        ids, mask = right_padded(tokenizer, texts[start:start + batch_size], device)
        rows = torch.arange(ids.shape[0], device=device)
        pos = torch.tensor(idxs[start:start + batch_size], device=device)
        with capture(modules, kind, stop_after=stop_name) as store:
            run_until(model, True, input_ids=ids, attention_mask=mask)
        for name, layer in names.items():
            vecs = store[name]  # on the layer's device
            out[layer].append(vecs[rows.to(vecs.device), pos.to(vecs.device)].float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def compute_keys(model, arch, tokenizer, requests, layers, templates) -> dict[int, torch.Tensor]:
    """{layer: K} with K of shape (d_in, n_requests), float32."""
    texts, idxs, owner, group = templated_prompts(tokenizer, requests, templates)
    per_text = read_at_subject(model, arch, tokenizer, texts, idxs, layers, "key")
    return {layer: average_keys(vecs, owner, group, len(requests), len(templates)) for layer, vecs in per_text.items()}


def average_keys(vecs: torch.Tensor, owner: list[int], group: list[int], n_requests: int, n_groups: int) -> torch.Tensor:
    """Per request, the mean over each template group, then over the groups: (d_in, n_requests)."""
    owner_t = torch.tensor(owner)
    group_t = torch.tensor(group)
    cols = []
    for r in range(n_requests):
        means = [vecs[((owner_t == r) & (group_t == g)).to(vecs.device)].mean(0) for g in range(n_groups)]
        cols.append(torch.stack(means).mean(0))
    return torch.stack(cols, dim=1)


class StagedForward:
    """Texts read at the subject layer after layer while an editor writes those layers in order.

    A MEMIT-style batch reads the keys of edit layer l_k after it wrote l_{k-1}; nothing below block
    l_{k-1} changed since the last read, so each read starts from the input of the lowest block the
    caller changes in between (``resume_from``), saved by the previous read, instead of from the
    embeddings. The same operations on the same inputs as a full pass: the same numbers."""

    def __init__(self, model, arch: Architecture, tokenizer, texts: list[str], idxs: list[int],
                 batch_size: int = 64):
        self.model, self.arch = model, arch
        self.device = input_device(model)
        self.chunks = []
        for start in range(0, len(texts), batch_size):
            ids, mask = right_padded(tokenizer, texts[start:start + batch_size], self.device)
            self.chunks.append((ids, mask, torch.tensor(idxs[start:start + batch_size], device=self.device)))
        self.saved: list[tuple | None] = [None] * len(self.chunks)  # (block, hidden, args, kwargs)

    def _block(self, i: int):
        return get_module(self.model, self.arch.layer_name(i))

    @torch.no_grad()
    def read(self, where: str, layer: int, resume_from: int) -> torch.Tensor:
        """(n_texts, d) at the subject positions: ``where`` as in :func:`read_at_subject`."""
        if where == "key":
            name, kind = self.arch.mlp_out_name(layer), "input"
        elif where == "value":  # the edited projection's output
            name, kind = self.arch.mlp_out_name(layer), "output"
        elif where == "hidden":
            name, kind = self.arch.layer_name(layer), "output"
        else:
            raise ValueError(f"where={where!r}: expected 'key', 'value' or 'hidden'")
        if resume_from > layer:
            raise ValueError(f"resume_from ({resume_from}) above the layer read ({layer})")
        module = get_module(self.model, name)
        out = []
        for c, (ids, mask, pos) in enumerate(self.chunks):
            with capture({name: module}, kind, stop_after=name) as store:
                self.saved[c] = self._pass(c, ids, mask, layer, resume_from)
            vecs = store[name]  # on the layer's device
            out.append(vecs[torch.arange(ids.shape[0], device=vecs.device), pos.to(vecs.device)].float())
        return torch.cat(out)

    def _pass(self, c: int, ids, mask, layer: int, resume_from: int) -> tuple:
        saved = self.saved[c]
        if saved is not None and saved[0] > resume_from:
            raise ValueError(f"block {saved[0]} is saved; cannot resume from the lower block {resume_from}")
        keep = {}

        def save_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            keep["state"] = (resume_from, hidden, tuple(args[1:]),
                             {k: v for k, v in kwargs.items() if k != "hidden_states"})

        if saved is None:
            handle = self._block(resume_from).register_forward_pre_hook(save_input, with_kwargs=True)
            try:
                run_until(self.model, True, input_ids=ids, attention_mask=mask)
            finally:
                handle.remove()
            return keep["state"]
        start, hidden, args, kwargs = saved
        try:
            for b in range(start, layer + 1):
                if b == resume_from:
                    keep["state"] = (b, hidden, args, kwargs)
                out = self._block(b)(hidden, *args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        except StopForward:
            pass
        return keep["state"]


def bare_prompts(tokenizer, requests) -> tuple[list[str], list[int]]:
    """Each request's prompt with its subject, and the subject's last token index."""
    return ([r.prompt.format(r.subject) for r in requests],
            [subject_last_index(tokenizer, r.prompt, r.subject) for r in requests])
