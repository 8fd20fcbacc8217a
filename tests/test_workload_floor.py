"""benchmarks/workload_floor.py: the bound it prints is the arithmetic its docstring states."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from workload_floor import floor, mixed_floor, shape_sizes  # noqa: E402

CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}


def test_shape_sizes_count_every_projection():
    weights, matmul, kv = shape_sizes(CFG)
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    assert matmul == 2 * per_layer + 100 * 64
    assert weights == 2 * (2 * per_layer + 2 * 100 * 64)
    assert kv == 2 * 2 * 2 * 32      # K and V, bf16, 2 layers, 2 heads x 16
    assert shape_sizes(CFG, kv_bytes=1)[2] == kv // 2   # an fp8 KV cache


def test_floor_takes_the_slower_of_bytes_and_flops_per_step():
    weights, matmul, kv = shape_sizes(CFG)
    ins, outs = np.array([10, 20]), np.array([3, 2])
    bw, fl = 1e6, 1e9
    r = floor(ins, outs, CFG, bw, fl)
    # step 1: both requests (contexts 11 and 21); step 2: the first only (context 12)
    steps = [max((weights + 32 * kv) / bw, 2 * 2 * matmul / fl), max((weights + 12 * kv) / bw, 2 * matmul / fl)]
    assert r["decode_s"] == pytest.approx(sum(steps))
    assert r["prefill_s"] == pytest.approx(30 * 2 * matmul / fl)
    assert r["max_output_tok_s"] == pytest.approx(5 / (r["prefill_s"] + r["decode_s"]))
    fp8 = floor(ins, outs, CFG, bw, fl, kv_bytes=1)
    assert fp8["kv_read_tb"] == pytest.approx(r["kv_read_tb"] / 2)


def test_mixed_floor_counts_every_step_weight_and_kv_read():
    weights, matmul, kv = shape_sizes(CFG)
    ins, outs = np.array([10, 20]), np.array([3, 2])
    # 3 steps (the longest output); KV reads: contexts 11 + 12 (first) and 21 (second)
    memory = (3 * weights + (11 + 12 + 21) * kv) / 1e6
    compute = (30 + 2 + 1) * 2 * matmul / 1e9
    m = mixed_floor(ins, outs, CFG, 1e6, 1e9)
    assert m["mixed_memory_s"] == pytest.approx(memory)
    assert m["mixed_compute_s"] == pytest.approx(compute)
    assert m["mixed_max_output_tok_s"] == pytest.approx(5 / max(memory, compute))
    # the KV reads are those the per-step bound counts
    assert m["mixed_memory_s"] - 3 * weights / 1e6 == pytest.approx(floor(ins, outs, CFG, 1e6, 1e9)["kv_read_tb"] * 1e12 / 1e6)


def test_cli_prints_the_bound():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "workload_floor.py"),
                          "--bandwidth-gb-s", "3015", "--num-prompts", "50"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "sharegpt-synthetic x 50 on llama-3.1-8b" in out and "output tok/s" in out
    assert "prompts mixed into decode steps" in out
