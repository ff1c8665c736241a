"""humaneval_edit: 20 HumanEval problems, pass@1 of the greedy completion, run in harness.sandbox.

The default uses the first 20 problems bundled in ``harness/data/general/humaneval``;
``--metadata '{"humaneval_path": "<HumanEval.jsonl.gz>"}'`` uses a full local copy. A sample
passes when prompt + completion + the problem's tests run to the end in the sandbox.
"""

from __future__ import annotations

from harness.data.general import bundled, read_jsonl, splits
from harness.sandbox import run_python

BUNDLED = bundled("humaneval/HumanEval_first20.jsonl")


def load_humaneval(humaneval_path: str | None = None, **_ignored):
    return splits(test=read_jsonl(humaneval_path or BUNDLED))


def check_program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def process_results(doc: dict, results: list[str]) -> dict:
    return {"pass@1": float(run_python(check_program(doc, results[0])).passed)}
