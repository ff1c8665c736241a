"""Shared test set-up.

Fixtures that load a model, compute statistics or run a sweep are session-scoped: under
``pytest -n`` a worker interleaves the tests of different modules, and a module-scoped fixture
is built again each time the worker comes back to its module.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
