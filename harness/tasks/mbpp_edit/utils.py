"""mbpp_edit: 20 MBPP test problems, pass@1 of the greedy completion, run in harness.sandbox.

The default scores task ids 11-30 (the start of the standard test split, ids 11-510) bundled in
``harness/data/general/mbpp``, prompted 3-shot with task ids 2-4 as in the MBPP paper;
``--metadata '{"mbpp_path": "<mbpp.jsonl>"}'`` scores the whole test split of a local copy.
"""

from __future__ import annotations

import re

from harness.data.general import bundled, read_jsonl, splits
from harness.sandbox import run_python

BUNDLED_TEST = bundled("mbpp/test_11-30.jsonl")
BUNDLED_PROMPT = bundled("mbpp/prompt_2-4.jsonl")
TEST_IDS = range(11, 511)
PROMPT_IDS = (2, 3, 4)

_FENCED = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


def _normalised(record: dict) -> dict:
    return {**record, "code": record["code"].replace("\r\n", "\n")}


def load_mbpp(mbpp_path: str | None = None, **_ignored):
    if mbpp_path:
        by_id = {r["task_id"]: _normalised(r) for r in read_jsonl(mbpp_path)}
        test = [by_id[i] for i in TEST_IDS if i in by_id]
        prompt = [by_id[i] for i in PROMPT_IDS]
    else:
        test = [_normalised(r) for r in read_jsonl(BUNDLED_TEST)]
        prompt = [_normalised(r) for r in read_jsonl(BUNDLED_PROMPT)]
    return splits(test=test, prompt=prompt)


def extract_code(generation: str) -> str:
    """The code of a completion: the first fenced block if the model wrote one, else all of it."""
    fenced = _FENCED.search(generation)
    return (fenced.group(1) if fenced else generation).strip("\n")


def check_program(doc: dict, generation: str) -> str:
    tests = "\n".join(doc["test_list"])
    return f"{doc['test_setup_code']}\n{extract_code(generation)}\n\n{tests}\n"


def process_results(doc: dict, results: list[str]) -> dict:
    return {"pass@1": float(run_python(check_program(doc, results[0])).passed)}
