"""Shared test set-up.

Fixtures that load a model, compute statistics or run a sweep are session-scoped: under
``pytest -n`` a worker interleaves the tests of different modules, and a module-scoped fixture
is built again each time the worker comes back to its module.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_the_cores_between_workers() -> None:
    """Under ``pytest -n N`` each worker's torch would start one thread per core, so N workers on
    N cores run N*N spinning threads, and a worker whose partner is busy loses most of its time:
    on the 2-core development machine the suite took 26.5 min so, and 13.9 min with one thread a
    worker, from fresh caches both times. Each worker takes its share of the cores; processes the
    tests start (lm_eval, sweep cells) inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, share)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores_between_workers()

import pytest  # noqa: E402


def _allow_code_where_the_kernel_cannot_contain_it() -> None:
    """Where the kernel lacks Landlock or a PID namespace the sandbox refuses to run code; the
    tests of its other layers (limits, guard) and of the code tasks then opt in. The escape test
    clears this and checks the refusal itself (tests/test_sandbox_escapes.py)."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    from harness import sandbox

    if sandbox.kernel_protection().missing:
        os.environ.setdefault(sandbox.UNPROTECTED_ENV, "1")


_allow_code_where_the_kernel_cannot_contain_it()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2's tokenizer (byte-level BPE, GPT-2 style, no BOS)."""
    from harness.loading import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma-3's tokenizer from the ``gemma`` extra's GGUF (SentencePiece BPE without a dummy
    prefix: 'Paris' and ' Paris' are different tokens; BOS first)."""
    from harness.loading import load_tokenizer

    return load_tokenizer("gemma3")
