"""gsm8k_edit: a 50-problem offline GSM8K probe scored by the exact final number.

The default scores the first 50 problems of the GSM8K test split bundled in
``harness/data/general/gsm8k``; ``--metadata '{"gsm8k_path": "<test.jsonl>"}'`` scores a full
local copy instead. Few-shot examples (``--num_fewshot`` up to 8, worked solutions ending in
``#### <number>``) come from the last 8 test problems, which are never scored.
"""

from __future__ import annotations

from harness.data.general import bundled, read_jsonl, splits

BUNDLED_TEST = bundled("gsm8k/test_first50.jsonl")
FEWSHOT_POOL = bundled("gsm8k/fewshot_pool_last8.jsonl")


def final_answer(solution: str) -> str:
    """The number after GSM8K's ``####`` marker, without thousands separators."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution without a '#### <answer>' line: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def load_gsm8k(gsm8k_path: str | None = None, **_ignored):
    """lm-eval ``custom_dataset``: splits ``test`` and ``fewshot``, each doc with ``final_answer``."""
    pool = read_jsonl(FEWSHOT_POOL)
    pool_questions = {r["question"] for r in pool}
    test = [r for r in read_jsonl(gsm8k_path or BUNDLED_TEST) if r["question"] not in pool_questions]
    with_answer = [[{**r, "final_answer": final_answer(r["answer"])} for r in rs] for rs in (test, pool)]
    return splits(test=with_answer[0], fewshot=with_answer[1])
