"""How much memory editing a large model needs, before anyone downloads it.

    python bench/memory_plan.py                     # Llama-3-8B and a 70B Llama, 5 edited layers
    python bench/memory_plan.py --layers 5 --batch 100 --markdown

The model is built from its config on PyTorch's ``meta`` device (shapes, no weights, no download),
and the edited MLP's shapes are read from it through the architecture table every editor uses. Per
edited layer (d_model x d_ff output projection) the script counts:

* the key statistics C0 (d_ff x d_ff, float32 as cached) and the original weights W0 (kept for the
  preservation loss and the trace);
* the state each editor keeps across batches (float64 where the solvers accumulate in float64):
  AlphaEdit's null-space projector and its memory of past keys, LyapLock's of past keys and values,
  RLSEdit's inverse-covariance P and its weights, PRUNE's raw weights;
* the target-value optimisation, per request and for one chunk of ``v_batch_size`` requests: the
  activations kept for the backward pass through the blocks above the last edited layer (float32),
  and the log-softmax over the vocabulary at every scored position (three copies: logits, their
  log-softmax and its gradient). Lower ``v_batch_size`` to fit a device: results do not change.

The last is an estimate with CounterFact-sized prompts (``--suffix_tokens`` tokens after the
subject, ``--target_tokens`` scored positions, 22 prompts per request); the rest is exact.
"""

from __future__ import annotations

import argparse

GiB = 1024 ** 3

# public configs of the models (transformers' LlamaConfig fields)
MODELS = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}
PROMPTS_PER_REQUEST = 22  # the bare prompt, 20 context templates, the essence prompt


def edited_shapes(config_fields: dict) -> dict:
    """d_model, d_ff, layers, vocab and the weight bytes of the model, read from a meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from harness.arch import architecture_for, get_module

    config = LlamaConfig(**config_fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch = architecture_for(model)
    weight = get_module(model, arch.mlp_out_name(0)).weight
    d_model, d_ff = (weight.shape[1], weight.shape[0]) if arch.transposed else tuple(weight.shape)
    return {"d_model": d_model, "d_ff": d_ff, "layers": arch.n_layers(model.config),
            "vocab": model.config.vocab_size,
            "weights_bf16": sum(p.numel() for p in model.parameters()) * 2}


def plan(shapes: dict, edited_layers: int, v_batch_size: int, suffix_tokens: int, target_tokens: int,
         weight_bytes: int = 2) -> list[tuple[str, float]]:
    """(what, bytes) rows for ``edited_layers`` edited layers."""
    d, f, v, n = shapes["d_model"], shapes["d_ff"], shapes["vocab"], edited_layers
    square32, square64 = f * f * 4, f * f * 8
    rows = [
        ("model weights (bf16)", shapes["weights_bf16"]),
        ("key statistics C0, float32", n * square32),
        ("original weights W0", n * d * f * weight_bytes),
        ("AlphaEdit: projector + memory of past keys (float64)", n * (square32 + square64)),
        ("LyapLock: memory of past keys and values (float64)", n * (square64 + d * f * 8)),
        ("RLSEdit: P + weights (float64)", n * (square64 + d * f * 8)),
        ("PRUNE: raw weights", n * d * f * weight_bytes),
    ]
    # one chunk of the target-value optimisation: activations of the upper blocks for the backward
    # pass (about 4 d_model + 3 d_ff values per token and block, float32) and the vocabulary rows
    per_request = (PROMPTS_PER_REQUEST * suffix_tokens * upper_blocks(shapes["layers"]) * (4 * d + 3 * f) * 4
                   + (PROMPTS_PER_REQUEST - 1) * target_tokens * v * 4 * 3)
    rows.append(("targets: per request optimised together", per_request))
    rows.append((f"targets: one chunk of v_batch_size={v_batch_size} requests", v_batch_size * per_request))
    return rows


def upper_blocks(n_layers: int) -> int:
    """Blocks above the last edited layer, which the target optimisation runs forward and back: the
    papers' band ends a quarter of the way up (layers 4-8 of Llama-3-8B's 32)."""
    return n_layers - 1 - round(0.25 * n_layers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--layers", type=int, default=5, help="edited layers (default: 5, as MEMIT)")
    p.add_argument("--v_batch_size", type=int, default=32)
    p.add_argument("--suffix_tokens", type=int, default=8)
    p.add_argument("--target_tokens", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        shapes = edited_shapes(MODELS[name])
        rows = plan(shapes, args.layers, args.v_batch_size, args.suffix_tokens, args.target_tokens)
        print(f"\n{name}: d_model {shapes['d_model']}, d_ff {shapes['d_ff']}, {shapes['layers']} layers, "
              f"vocab {shapes['vocab']}; {args.layers} edited layers")
        if args.markdown:
            print("\n| what | GiB |\n|---|---|")
        for what, size in rows:
            print(f"| {what} | {size / GiB:.1f} |" if args.markdown else f"  {what:<70}{size / GiB:>8.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
