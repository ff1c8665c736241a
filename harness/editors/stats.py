"""Second moment of the edited layers' keys, C0 = mean over corpus tokens of k k^T.

One pass over the corpus serves every edit layer (hooks on all of them, the forward pass stops
after the highest) and every method: for a bias-free projection V0 = W0 K0, so LyapLock's
V0K0^T = W0 C0 and tr(V0V0^T) = tr(W0 C0 W0^T) follow from C0. Summed over the corpus in float64
(each batch's Gram matrix in float32, at most ``batch_tokens`` terms per entry), cached on
disk under a key of model fingerprint, layer, corpus, sample count and truncation length, written
atomically, with a progress bar.

Corpora (``stats_corpus``): ``bundled`` (2,000 Wikipedia summaries shipped in the package),
a path to a .jsonl/.jsonl.gz/.txt file (one text per record, field ``text``) - e.g.
``../shared/data/text/wikipedia_vital_summaries_en.jsonl.gz`` - or ``wikipedia`` (Hugging Face
``wikimedia/wikipedia`` 20231101.en, needs the network, as the papers).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import cache_root
from harness.arch import Architecture, get_module
from harness.editors.hooks import capture, run_until

log = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "wikipedia_summaries_2000.jsonl.gz"


def corpus_texts(corpus: str, n_samples: int, seed: int = 1) -> tuple[list[str], str]:
    """(texts, corpus id for the cache key)."""
    if corpus in ("bundled", "", None):
        path = BUNDLED_CORPUS
    elif corpus == "wikipedia":
        from datasets import load_dataset

        ds = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        texts = [row["text"] for _, row in zip(range(n_samples), ds)]
        return texts, "wikimedia-wikipedia-20231101.en"
    else:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"stats_corpus={corpus!r}: no such file; use 'bundled', 'wikipedia' (network) or a "
                ".jsonl/.jsonl.gz/.txt path"
            )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if ".jsonl" in path.name:
            texts = [json.loads(line)["text"] for line in fh if line.strip()]
        else:
            texts = [t for t in fh.read().split("\n\n") if t.strip()]
    st = path.stat()
    corpus_id = f"{path.name}-{st.st_size}"
    if n_samples < len(texts):
        # a seeded sample, as the reference samples its Wikipedia texts
        texts = random.Random(seed).sample(texts, n_samples)
    return texts, corpus_id


def model_fingerprint(model) -> str:
    """Hash of the config and a strided sample of every parameter: statistics belong to weights."""
    h = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 512)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stats_path(cache_dir, fingerprint, layer, corpus_id, n_samples, max_tokens) -> Path:
    safe = corpus_id.replace("/", "_")
    return Path(cache_dir) / "stats" / fingerprint / safe / f"layer{layer}_n{n_samples}_t{max_tokens}_mom2_f32gram_f64sum.pt"


@torch.no_grad()
def accumulate_second_moments(model, arch: Architecture, tokenizer, layers, texts, max_tokens: int,
                              batch_tokens: int = 4096, progress: bool = True):
    """{layer: (C0 float64 (d_in, d_in), token count)} over all non-pad tokens of ``texts``."""
    device = next(model.parameters()).device
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
            k = store[name][keep]
            # one batch's Gram matrix (at most batch_tokens terms per entry) in float32 (a float64
            # model's in float64), the sum over the corpus in float64: the float64 product cost
            # 3x as much on a CPU and was half of this pass (the reference keeps both in float32)
            k = k if k.dtype == torch.float64 else k.float()
            gram = (k.T @ k).double()
            sums[layer] = gram if layer not in sums else sums[layer].add_(gram)
        count += int(keep.sum())
        bar.set_postfix(tokens=count)
    return {layer: (sums[layer] / count, count) for layer in layers}


def load_or_compute_second_moments(model, arch, tokenizer, layers, corpus: str, n_samples: int,
                                   max_tokens: int, cache_dir=None, fingerprint: str | None = None,
                                   progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: C0} (float64, on CPU), from the disk cache when present."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    fingerprint = fingerprint or model_fingerprint(model)
    texts, corpus_id = corpus_texts(corpus, n_samples)
    out, missing = {}, []
    for layer in layers:
        p = stats_path(cache_dir, fingerprint, layer, corpus_id, n_samples, max_tokens)
        if p.exists():
            out[layer] = torch.load(p, map_location="cpu", weights_only=True)["mom2"]
        else:
            missing.append(layer)
    if missing:
        computed = accumulate_second_moments(model, arch, tokenizer, missing, texts, max_tokens, progress=progress)
        for layer, (mom2, count) in computed.items():
            p = stats_path(cache_dir, fingerprint, layer, corpus_id, n_samples, max_tokens)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".tmp{os.getpid()}")
            torch.save({"mom2": mom2.cpu(), "tokens": count, "corpus": corpus_id, "n_samples": n_samples,
                        "max_tokens": max_tokens, "layer": layer}, tmp)
            os.replace(tmp, p)
            out[layer] = mom2.cpu()
    return out
