"""The mission's command, ``lm_eval --model <editor> --tasks counterfact_edit,glue``: lm-eval's own
GLUE group runs on the edited model from a local copy of its data, and without Hub or copy the
run stops before any edit with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GLUE_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
}


def _lm_eval():
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _command(tiny_dir, out):
    args = (f"pretrained={tiny_dir},hparams=smollm2-135m,layers=1,num_edits=2,edit_batch_size=2,"
            "v_num_grad_steps=2,stats_samples=20,stats_max_tokens=32")
    return [*_lm_eval(), "--model", "memit_hf", "--model_args", args,
            "--tasks", "counterfact_edit,glue", "--limit", "2", "--device", "cpu",
            "--output_path", str(out)]


def _run(cmd, tmp_path, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "SEQEDIT_CACHE": str(tmp_path / "seqedit-cache"), **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=environment)


def _glue_files(root: Path) -> Path:
    """A clone-of-the-hub-repository layout: <config>/<split>-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for config, columns in GLUE_COLUMNS.items():
        splits = ["train", "validation_matched", "validation_mismatched"] if config == "mnli" \
            else ["train", "validation"]
        for split in splits:
            rows = [{**{c: f"{config} {c} {split} {i}." for c in columns}, "label": i % 2, "idx": i}
                    for i in range(3)]
            (root / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / config / f"{split}-00000-of-00001.parquet")
    return root


def test_without_hub_or_copy_it_stops_before_editing_with_one_line(tiny_dir, tmp_path):
    proc = _run(_command(tiny_dir, tmp_path / "out"), tmp_path,
                HF_DATASETS_CACHE=str(tmp_path / "empty-datasets-cache"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lm_eval: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "nyu-mll/glue (cola" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert "seqedit hub-cache nyu-mll/glue" in errors[0] and "edit_glue" in errors[0]
    # no edit was made: the statistics an edit needs were never computed, no results written
    assert not (tmp_path / "seqedit-cache" / "stats").exists()
    assert not (tmp_path / "out").exists()


def test_glue_group_runs_on_the_edited_model_from_a_local_copy(tiny_dir, tmp_path):
    from harness.hub_datasets import main as hub_cache

    datasets_cache = tmp_path / "datasets-cache"
    assert hub_cache(["nyu-mll/glue", str(_glue_files(tmp_path / "glue")),
                      "--cache", str(datasets_cache)]) == 0
    # lm-eval's Python entry point with the same arguments as the command line, because its CLI
    # cannot turn off the bootstrap of MCC and F1 standard errors (5 minutes on two cores)
    args = _command(tiny_dir, tmp_path / "out")
    model_args = args[args.index("--model_args") + 1]
    code = ("import json, lm_eval\n"
            f"out = lm_eval.simple_evaluate(model='memit_hf', model_args={model_args!r}, "
            "tasks=['counterfact_edit', 'glue'], limit=2, device='cpu', bootstrap_iters=0)\n"
            "print(json.dumps(sorted(out['results'])))\n"
            "print(json.dumps(out['results']['counterfact_edit_scores']))")
    proc = _run([sys.executable, "-c", code], tmp_path, HF_DATASETS_CACHE=str(datasets_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks, scores = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert {"cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli"} <= set(tasks)
    assert "efficacy,none" in scores and "memit edits" in proc.stderr


def test_cache_entry_loads_through_datasets_offline(tmp_path, monkeypatch):
    import datasets

    from harness.hub_datasets import is_cached, write_cache_entry

    rows = [{"sentence": "a b", "label": 1, "idx": 0}, {"sentence": "c", "label": 0, "idx": 1}]
    write_cache_entry("nyu-mll/glue", "cola", {"validation": rows}, cache=tmp_path)
    assert is_cached("nyu-mll/glue", "cola", tmp_path) and not is_cached("nyu-mll/glue", "sst2", tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    loaded = datasets.load_dataset("nyu-mll/glue", "cola", cache_dir=str(tmp_path))
    assert loaded["validation"].to_list() == rows
