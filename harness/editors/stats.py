"""Second moment of the edited layers' keys, C0 = mean over corpus tokens of k k^T.

One pass over the corpus serves every edit layer (hooks on all of them, the forward pass stops
after the highest) and every method: for a bias-free projection V0 = W0 K0, so LyapLock's
V0K0^T = W0 C0 and tr(V0V0^T) = tr(W0 C0 W0^T) follow from C0. Summed over the corpus in float64
(each batch's Gram matrix in float32, at most ``batch_tokens`` terms per entry), written
atomically, with a progress bar.

The sample, as the reference's ``layer_stats``: ``stats_samples`` texts drawn uniformly without
replacement with a fixed seed (1) from the whole corpus, each truncated to ``stats_max_tokens``
tokens (null: the model's context length, as the reference, e.g. 8192 for Llama-3), every
non-pad token counted. The disk cache key holds everything the result depends on: the weights
below the layer, the layer, the corpus's content (sha256 of the file, or the datasets
fingerprint of the Hub dataset), the number of texts, the token budget per text, the tokenizer
(hash of its vocabulary and rules) and the seed. The weights part hashes, in full, every
parameter the layer's keys depend on. A cache entry is validated when loaded (readable, the
layer's, the right shape, finite); a damaged one is recomputed with a warning naming the file.

Corpora (``stats_corpus``): ``bundled`` (2,000 Wikipedia summaries shipped in the package),
a path to a .jsonl/.jsonl.gz/.txt file (one text per record, field ``text``) - e.g.
``../shared/data/text/wikipedia_vital_summaries_en.jsonl.gz`` - or ``wikipedia`` (Hugging Face
``wikimedia/wikipedia`` 20231101.en downloaded whole, about 20 GB, and sampled uniformly, as the
papers). ``wikipedia:stream`` streams it instead and takes the first ``stats_samples`` texts of
a shuffle buffer of 10,000 (seeded): no download, but not a uniform sample of Wikipedia.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import cache_root
from harness.arch import Architecture, edit_weight, get_module, weight_as_out_in
from harness.editors.hooks import capture, run_until
from harness.loading import file_sha256
from harness.placement import input_device, named_parameter_values

log = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "wikipedia_summaries_2000.jsonl.gz"
SAMPLE_SEED = 1  # the reference's random_sample=1
WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")
STREAM_BUFFER = 10_000


@dataclass
class CorpusSample:
    texts: list[str]
    corpus_id: str  # the corpus's identity: name and content hash


def corpus_texts(corpus: str, n_samples: int, seed: int = SAMPLE_SEED) -> CorpusSample:
    """``n_samples`` texts drawn uniformly without replacement (seeded) from the corpus (all of
    them when it has fewer), and the corpus's identity for the cache key."""
    if corpus in ("wikipedia", "wikipedia:stream"):
        return _wikipedia_texts(n_samples, seed, stream=corpus.endswith(":stream"))
    if corpus in ("bundled", "", None):
        path = BUNDLED_CORPUS
    else:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"stats_corpus={corpus!r}: no such file; use 'bundled', 'wikipedia' (network), "
                "'wikipedia:stream' (network) or a .jsonl/.jsonl.gz/.txt path"
            )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if ".jsonl" in path.name:
            texts = [json.loads(line)["text"] for line in fh if line.strip()]
        else:
            texts = [t for t in fh.read().split("\n\n") if t.strip()]
    if n_samples < len(texts):
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n_samples))]
    return CorpusSample(texts, f"{path.name}-sha256-{file_sha256(path)[:16]}")


def _wikipedia_texts(n_samples: int, seed: int, stream: bool) -> CorpusSample:
    from datasets import load_dataset

    name, config = WIKIPEDIA
    if stream:
        ds = load_dataset(name, config, split="train", streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=STREAM_BUFFER)
        texts = [row["text"] for _, row in zip(range(n_samples), ds)]
        return CorpusSample(texts, f"{name}-{config}-stream-buffer{STREAM_BUFFER}")
    ds = load_dataset(name, config, split="train")
    picked = sorted(random.Random(seed).sample(range(len(ds)), min(n_samples, len(ds))))
    texts = list(ds.select(picked)["text"])
    return CorpusSample(texts, f"{name}-{config}-{getattr(ds, '_fingerprint', len(ds))}")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what turns text into ids: a fast tokenizer's full serialisation (vocabulary,
    merges, normaliser, pre-tokeniser), else the vocabulary and the tokenizer class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the truncation and padding left by the latest call are state, not rules
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            text = backend.to_str()
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
    else:
        text = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_context_length(model) -> int:
    """The longest sequence the model takes (the reference truncates its statistics texts there)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(config).__name__} states no context length; set stats_max_tokens")


def keys_fingerprints(model, arch: Architecture, layers) -> dict[int, str]:
    """Per edit layer, a hash of every weight its keys depend on, in full: the config, the
    parameters outside the blocks (embeddings, final norm, head) and blocks 0..layer. A change to
    any single one of them gives other statistics; a change above the layer does not."""
    blocks = [arch.layer_name(i) + "." for i in range(arch.n_layers(model.config))]

    def block_of(name):
        return next((i for i, prefix in enumerate(blocks) if name.startswith(prefix)), -1)

    params = sorted(named_parameter_values(model), key=lambda item: (block_of(item[0]), item[0]))
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    out, wanted = {}, sorted(layers)
    with torch.no_grad():
        for name, p in params:
            block = block_of(name)
            while wanted and block > wanted[0]:
                out[wanted.pop(0)] = digest.hexdigest()[:16]
            if not wanted:
                break
            digest.update(name.encode())
            digest.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    for layer in wanted:
        out[layer] = digest.hexdigest()[:16]
    return out


def stats_path(cache_dir, fingerprint, layer, corpus_id, n_texts, max_tokens, tokenizer_id,
               seed: int = SAMPLE_SEED) -> Path:
    safe = corpus_id.replace("/", "_")
    name = f"layer{layer}_n{n_texts}_t{max_tokens}_tok{tokenizer_id}_seed{seed}_mom2_f32gram_f64sum.pt"
    return Path(cache_dir) / "stats" / fingerprint / safe / name


@torch.no_grad()
def accumulate_second_moments(model, arch: Architecture, tokenizer, layers, texts, max_tokens: int,
                              batch_tokens: int = 4096, progress: bool = True):
    """{layer: (C0 float64 (d_in, d_in), token count)} over all non-pad tokens of ``texts``."""
    device = input_device(model)
    names = {arch.mlp_out_name(layer): layer for layer in layers}
    modules = {n: get_module(model, n) for n in names}
    stop = arch.mlp_out_name(max(layers))
    sums, count = {}, 0
    encoded = [tokenizer(t, truncation=True, max_length=max_tokens).input_ids for t in texts]
    encoded = [e for e in encoded if e]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(encoded[i]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    bar = tqdm(batches, desc=f"key statistics (layers {list(layers)})", unit="batch", disable=not progress)
    pad = tokenizer.pad_token_id
    for batch in bar:
        width = max(len(encoded[i]) for i in batch)
        ids = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in batch], device=device)
        with capture(modules, "input", stop_after=stop) as store:
            run_until(model, True, input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        for name, layer in names.items():
            k = store[name][keep.to(store[name].device)]
            # one batch's Gram matrix (at most batch_tokens terms per entry) in float32 (a float64
            # model's in float64), the sum over the corpus in float64: the float64 product cost
            # 3x as much on a CPU and was half of this pass (the reference keeps both in float32)
            k = k if k.dtype == torch.float64 else k.float()
            gram = (k.T @ k).double()
            sums[layer] = gram if layer not in sums else sums[layer].add_(gram)
        count += int(keep.sum())
        bar.set_postfix(tokens=count)
    return {layer: (sums[layer] / count, count) for layer in layers}


def _cached_second_moment(path: Path, layer: int, d_in: int) -> torch.Tensor | None:
    """The cached C0 of ``layer``, or None (with a warning naming the file) when the entry is
    unreadable, of another layer or shape, or not finite: it is then recomputed."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: whatever torch raises
        log.warning("statistics cache %s is unreadable (%s: %s); recomputing it", path, type(exc).__name__, exc)
        return None
    mom2 = payload.get("mom2") if isinstance(payload, dict) else None
    if not isinstance(mom2, torch.Tensor) or tuple(mom2.shape) != (d_in, d_in):
        problem = f"holds {type(mom2).__name__} {tuple(getattr(mom2, 'shape', ()))}, expected ({d_in}, {d_in})"
    elif payload.get("layer") != layer:
        problem = f"is for layer {payload.get('layer')}, not {layer}"
    elif not torch.isfinite(mom2).all():
        problem = "holds NaN/Inf"
    else:
        return mom2
    log.warning("statistics cache %s %s; recomputing it", path, problem)
    return None


def load_or_compute_second_moments(model, arch, tokenizer, layers, corpus: str, n_samples: int,
                                   max_tokens: int | None, cache_dir=None,
                                   progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: C0} (float64, on CPU), from the disk cache when a valid entry is there.
    ``max_tokens`` None: the model's context length."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if max_tokens is None:
        max_tokens = model_context_length(model)
    sample = corpus_texts(corpus, n_samples)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    weights_id = keys_fingerprints(model, arch, layers)

    def path(layer):
        return stats_path(cache_dir, weights_id[layer], layer, sample.corpus_id, len(sample.texts), max_tokens,
                          tokenizer_id)

    out, missing = {}, []
    for layer in layers:
        d_in = weight_as_out_in(edit_weight(model, arch, layer), arch).shape[1]
        cached = _cached_second_moment(path(layer), layer, d_in)
        if cached is None:
            missing.append(layer)
        else:
            out[layer] = cached
    if missing:
        computed = accumulate_second_moments(model, arch, tokenizer, missing, sample.texts, max_tokens, progress=progress)
        for layer, (mom2, count) in computed.items():
            if not torch.isfinite(mom2).all():
                raise FloatingPointError(
                    f"the key statistics of layer {layer} are not finite (NaN/Inf activations on the "
                    f"corpus {sample.corpus_id}); check the model's dtype (float32) and weights")
            p = path(layer)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".tmp{os.getpid()}")
            torch.save({"mom2": mom2.cpu(), "tokens": count, "corpus": sample.corpus_id,
                        "n_texts": len(sample.texts), "max_tokens": max_tokens, "tokenizer": tokenizer_id,
                        "seed": SAMPLE_SEED, "layer": layer}, tmp)
            os.replace(tmp, p)  # atomic: a parallel writer of the same entry writes the same values
            out[layer] = mom2.cpu()
    return out
