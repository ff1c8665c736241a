import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


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
