"""The reference fluency sampler: lengths, batching invariance, and agreement with a plain
one-prompt-at-a-time sampler without cache or padding."""

from __future__ import annotations

import pytest
import torch

from harness.generation import sample_to_total_length
from harness.testing import tiny_model


@pytest.fixture(scope="module")
def model_and_prompts():
    model, tok = tiny_model("llama", seed=3)
    texts = ["Paris", "The mother tongue of Danielle Darrieux is",
             "Toko Yasuda, the", "A"]
    return model, tok, [tok(t).input_ids for t in texts]


def plain_sampler(model, prompt, total, top_k, seed):
    """generate_fast for one prompt, spelled out: whole-sequence forward each step."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) < total:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            top_probs, top_ids = torch.softmax(logits, -1).topk(top_k)
            ids.append(int(top_ids[torch.multinomial(top_probs, 1, generator=generator)]))
    return ids[len(prompt):]


def test_every_prompt_is_filled_to_the_total_and_batching_changes_nothing(model_and_prompts):
    model, tok, prompts = model_and_prompts
    seeds = [11, 12, 13, 14]
    total = 24
    one_by_one = sample_to_total_length(model, prompts, total, 5, tok.pad_token_id, seeds, batch_size=1)
    for batch_size in (2, 3, 64):
        assert sample_to_total_length(model, prompts, total, 5, tok.pad_token_id, seeds,
                                      batch_size=batch_size) == one_by_one
    assert [len(p) + len(n) for p, n in zip(prompts, one_by_one)] == [total] * len(prompts)
    for prompt, new, seed in zip(prompts, one_by_one, seeds):
        assert new == plain_sampler(model, prompt, total, 5, seed)


def test_no_stop_at_end_of_text_and_long_prompts_get_nothing(model_and_prompts):
    model, tok, prompts = model_and_prompts
    # a model that always prefers end-of-text still writes up to the total, as the reference
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 100.0
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        out = sample_to_total_length(model, prompts, 16, 1, tok.pad_token_id, [0, 1, 2, 3])
    finally:
        model.lm_head.bias = None
    assert all(set(new) == {tok.eos_token_id} for new in out)
    assert [len(p) + len(n) for p, n in zip(prompts, out)] == [16] * len(prompts)
    longest = max(len(p) for p in prompts)
    out = sample_to_total_length(model, prompts, longest, 5, tok.pad_token_id, [0, 1, 2, 3])
    assert [len(n) for n in out] == [longest - len(p) for p in prompts]
