"""bench/memory_plan.py: shapes from a meta-device model, and the memory it adds up."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("memory_plan", Path(__file__).parent.parent / "bench" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_plan)


def test_shapes_come_from_a_meta_model_and_the_plan_adds_them_up():
    fields = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
    shapes = memory_plan.edited_shapes(fields)
    assert (shapes["d_model"], shapes["d_ff"], shapes["layers"], shapes["vocab"]) == (64, 256, 8, 1000)
    rows = dict(memory_plan.plan(shapes, edited_layers=2, v_batch_size=4, suffix_tokens=8, target_tokens=3))
    assert rows["key statistics C0, float32"] == 2 * 256 * 256 * 4
    assert rows["LyapLock: memory of past keys and values (float64)"] == 2 * (256 * 256 + 64 * 256) * 8
    per_request = rows["targets: per request optimised together"]
    assert rows["targets: one chunk of v_batch_size=4 requests"] == 4 * per_request
    # 22 prompts x 8 tokens through the 5 blocks above layer 2, and 21 x 3 vocabulary rows, 3 copies
    assert per_request == pytest.approx(22 * 8 * 5 * (4 * 64 + 3 * 256) * 4 + 21 * 3 * 1000 * 4 * 3)
