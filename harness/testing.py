"""Tiny random models for fast tests, with the embedded SmolLM2 tokenizer.

They have real architectures (Llama, GPT-2 with Conv1D weights, GPT-J, Gemma 3 with its norm after
the MLP) but a few thousand hidden units, so an edit or an evaluation takes well under a second.
Weights are random and seeded.
"""

from __future__ import annotations

TINY_SIZES = dict(hidden=64, ffn=128, layers=4, heads=4, positions=256)


def tiny_tokenizer():
    from harness.loading import load_tokenizer, prepare_tokenizer

    return prepare_tokenizer(load_tokenizer())


def tiny_config(arch: str, vocab_size: int, token_ids: dict | None = None, **overrides):
    """``token_ids``: bos/eos/pad ids of the tokenizer, given at construction because GPT-2's and
    GPT-J's defaults (50256) lie outside a smaller vocabulary and transformers warns about them."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    s = {**TINY_SIZES, **overrides}
    ids = dict(token_ids or {})
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["ffn"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"], max_position_embeddings=s["positions"],
            tie_word_embeddings=False, **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=s["hidden"], n_inner=s["ffn"], n_layer=s["layers"],
            n_head=s["heads"], n_positions=s["positions"], **ids,
        )
    if arch == "gptj":
        return GPTJConfig(
            vocab_size=vocab_size, n_embd=s["hidden"], n_inner=s["ffn"], n_layer=s["layers"],
            n_head=s["heads"], n_positions=s["positions"], rotary_dim=s["hidden"] // s["heads"], **ids,
        )
    if arch == "gemma3":  # RMSNorm after the MLP, sliding-window attention on some layers
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["ffn"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
            head_dim=s["hidden"] // s["heads"], max_position_embeddings=s["positions"], sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * (s["layers"] // 2) + ["full_attention"] * (s["layers"] % 2),
            **ids,
        )
    raise ValueError(f"tiny models exist for 'llama', 'gpt2', 'gptj', 'gemma3', not {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """(model, tokenizer): a small random model of ``arch`` on CPU in float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(arch, len(tok), token_ids={
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "gemma3":
        # trained Gemma's norm after the MLP has gains from 0 to tens by unit; initialised ones are
        # all 1 (weight 0), which would hide what the editors must handle
        with torch.no_grad():
            for block in model.model.layers:
                gain = torch.randn(config.hidden_size).abs() * 4
                gain[torch.randperm(config.hidden_size)[: config.hidden_size // 16]] = 0.0
                block.post_feedforward_layernorm.weight.copy_(gain - 1.0)
    model.eval()
    return model, tok
