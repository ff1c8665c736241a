"""Bundled data for the general-capability tasks (edit_glue, gsm8k_edit, humaneval_edit, mbpp_edit,
wikitext_edit).

Only small subsets ship here (see LICENSE.md in this directory) so the tasks run offline; each
task takes a path to the full local files through lm-eval's ``--metadata``. The task
directories under ``harness/tasks`` build their datasets with :func:`splits`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

GENERAL_DATA_DIR = Path(__file__).parent


def bundled(relative: str) -> Path:
    return GENERAL_DATA_DIR / relative


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a ``.jsonl`` or ``.jsonl.gz`` file; names the file and line on bad JSON."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({exc.msg})") from None
    return records


def splits(**named_records: list[dict]):
    """A ``datasets.DatasetDict`` with one split per keyword (what lm-eval's custom_dataset returns)."""
    import datasets

    return datasets.DatasetDict(
        {name: datasets.Dataset.from_list(records) for name, records in named_records.items()}
    )
