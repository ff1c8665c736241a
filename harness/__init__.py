"""Benchmark harness for sequential knowledge editing, built on lm-evaluation-harness.

Importing this package is deliberately cheap (no torch): it is imported at interpreter
start-up by ``harness_lm_eval.pth`` so that ``lm_eval`` finds our models and tasks.
"""

__version__ = "0.1.0"

MODEL_NAMES = {
    "ft_hf": "FTLM",
    "rome_hf": "ROMELM",
    "memit_hf": "MEMITLM",
    "prune_hf": "PRUNELM",
    "rect_hf": "RECTLM",
    "alphaedit_hf": "AlphaEditLM",
    "lyaplock_hf": "LyapLockLM",
    "rlsedit_hf": "RLSEditLM",
    "encore_hf": "ENCORELM",
}


def tasks_dir() -> str:
    """Directory holding our lm-eval task YAMLs (pass as ``--include_path`` if needed)."""
    import os

    return os.path.join(os.path.dirname(__file__), "tasks")


def cache_root():
    """Where downloads, dequantised models and key statistics are cached (``$SEQEDIT_CACHE``)."""
    import os
    from pathlib import Path

    return Path(os.environ.get("SEQEDIT_CACHE", Path.home() / ".cache" / "seqedit"))
