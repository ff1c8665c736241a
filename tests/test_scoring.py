"""harness/scoring.py gives lm-eval's HFLM answers (summed log-probability, is-greedy) for every
kind of overlap it exploits, on each tiny architecture, and the editing wrappers use it."""

from __future__ import annotations

import random

import pytest
import torch

from harness import scoring


def _requests(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    requests = []
    for _ in range(3):  # ZsRE-like chains: each step the previous one plus a token
        question, answer = tokens(rng.randrange(4, 12)), tokens(rng.randrange(2, 7))
        requests += [(question + answer[:i], answer[i:i + 1]) for i in range(len(answer))]
        requests.append((question, answer))  # and the whole answer at once
    for _ in range(4):  # CounterFact / multiple-choice: one context, several continuations
        context = tokens(rng.randrange(3, 40))
        requests += [(context, tokens(rng.randrange(1, 4))) for _ in range(rng.randrange(2, 5))]
    for _ in range(2):  # rolling windows: a one-token context, no prefix to cache
        requests.append((tokens(1), tokens(rng.randrange(5, 30))))
    requests.append(requests[0])  # a duplicate
    rng.shuffle(requests)
    return requests


def _hflm(model, tok):
    """HFLM without its one-token logits cache: with it, (q + a[:-1], a[-1]) scored in the same
    call as (q, a) gets a value that differs from the model's (seen with lm-eval 0.4.13 on these
    requests; the engine agrees with a plain forward pass, checked below)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", logits_cache=False)


def _direct(model, requests):
    answers = []
    with torch.no_grad():
        for context, continuation in requests:
            logprobs = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0, :-1], -1)
            rows = logprobs[len(context) - 1:]
            answers.append((float(rows.gather(-1, torch.tensor(continuation)[:, None]).sum()),
                            bool((rows.argmax(-1) == torch.tensor(continuation)).all())))
    return answers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("budgets", ["default", "tiny"])
def test_scores_equal_hflm_for_chains_shared_contexts_and_rolling_windows(arch, budgets, monkeypatch):
    from harness.testing import tiny_model

    if budgets == "tiny":  # many batches, several rounds per batch, mixed prefix lengths
        monkeypatch.setattr(scoring, "PREFIX_TOKENS_PER_BATCH", 48)
        monkeypatch.setattr(scoring, "SUFFIX_TOKENS_PER_BATCH", 24)
        monkeypatch.setattr(scoring, "MAX_ROWS", 3)
    model, tok = tiny_model(arch)
    requests = _requests(len(tok), seed=1)
    reference = _hflm(model, tok)._loglikelihood_tokens([(None, c, x) for c, x in requests],
                                                        disable_tqdm=True)
    seen = []
    ours = scoring.score(model, requests, tok.pad_token_id, progress=seen.append)
    assert sum(seen) == len(requests)
    for (ref_ll, ref_greedy), (ll, greedy), (direct_ll, _) in zip(reference, ours, _direct(model, requests)):
        assert ll == pytest.approx(ref_ll, abs=2e-4, rel=1e-5)
        assert ll == pytest.approx(direct_ll, abs=2e-4, rel=1e-5)
        assert greedy == ref_greedy
    # the overlaps were there to share: fewer tokens run than HFLM runs
    sequences = [tuple(c) + tuple(x) for c, x in requests]
    carriers = scoring._carriers(sequences, [len(c) - 1 for c, _ in requests])
    groups = scoring._groups(carriers)
    ran = sum(len(g.prefix) for g in groups) + sum(len(c.tokens) - 1 - c.first for c in carriers)
    assert ran < 0.6 * sum(len(s) - 1 for s in sequences)


def test_a_request_is_read_from_the_longest_sequence_it_begins():
    carriers = scoring._carriers([(1, 2), (1, 2, 3), (1, 2, 3, 4), (1, 5), (1, 2, 3)], [0, 1, 2, 0, 1])
    by_tokens = {c.tokens: sorted(m[0] for m in c.members) for c in carriers}
    assert by_tokens == {(1, 2, 3, 4): [0, 1, 2, 4], (1, 5): [3]}
    assert {c.tokens: c.first for c in carriers} == {(1, 2, 3, 4): 0, (1, 5): 0}


def test_the_editing_wrapper_scores_through_the_engine_and_hands_overlong_requests_to_hflm(monkeypatch):
    from harness.models import MEMITLM
    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    lm = MEMITLM(pretrained=model, tokenizer=tok, num_edits=0, hparams="smollm2-135m", layers="1-2",
                 progress=False)
    engine_calls = []
    real_score = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **k: engine_calls.append(len(a[1])) or real_score(*a, **k))
    rng = random.Random(3)
    long_context = [rng.randrange(3, len(tok)) for _ in range(lm.max_length + 20)]
    requests = [(("a", "b"), c, x) for c, x in _requests(len(tok), seed=2)]
    requests.append((("long", "x"), long_context, [7, 8]))  # HFLM cuts it from the left
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    reference = _hflm(model, tok)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert engine_calls == [len(requests) - 1]
    for (ref_ll, ref_greedy), (ll, greedy) in zip(reference, ours):
        assert ll == pytest.approx(ref_ll, abs=2e-4, rel=1e-5)
        assert greedy == ref_greedy
    assert torch.isfinite(torch.tensor([a for a, _ in ours])).all()


def test_sliding_window_models_score_long_sequences_whole():
    """Gemma 3's sliding-window layers drop the states that leave the window, so a cache cut
    back after a round cannot be restored: sequences as long as the window run without one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from harness.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                           "full_attention"], max_position_embeddings=256,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    assert scoring.sliding_window(model) == 8
    requests = _requests(len(tok), seed=4)
    assert any(len(c) + len(x) < 8 for c, x in requests) and any(len(c) + len(x) > 20 for c, x in requests)
    ours = scoring.score(model, requests, tok.pad_token_id)
    for (direct_ll, direct_greedy), (ll, greedy) in zip(_direct(model, requests), ours):
        assert ll == pytest.approx(direct_ll, abs=2e-4, rel=1e-5)
        assert greedy == direct_greedy
