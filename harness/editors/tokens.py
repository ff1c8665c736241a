"""Tokenisation helpers shared by keys, target values and scoring: right-padded batches and the
position of the subject's last token."""

from __future__ import annotations

import torch


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """Index of the subject's last token in ``template.format(subject)``: the length of the
    encoded text up to and including the subject, minus one (encoded on its own, as the
    reference does)."""
    prefix = template[: template.index("{}")]
    return len(tokenizer(prefix + subject).input_ids) - 1


def right_padded(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tokenizer(t).input_ids for t in texts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
    return ids, mask


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of the edit target as the reference encodes it: a leading space is added unless
    the target already has one (MEMIT's request preprocessing), and a BOS or UNK token the
    tokenizer puts first is dropped (``compute_z``)."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text).input_ids
    leading = {tokenizer.bos_token_id, tokenizer.unk_token_id} - {None}
    if ids and ids[0] in leading:
        ids = ids[1:]
    return ids
