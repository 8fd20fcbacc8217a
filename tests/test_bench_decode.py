"""benchmarks/bench_decode.py on the CPU: one row per batch size, each with the floor its docstring
states (the weights, plus the batch's KV at the mean context from batch 2 on)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_reports_each_batch_size_against_its_floor(tmp_path):
    out = tmp_path / "decode.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_decode.py", "--shape", "qwen2.5-0.5b", "--device", "cpu",
                           "--prompt-len", "16", "--output-len", "6", "--batch-size", "1", "3",
                           "--output-file", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["batches"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    bw, weights = result["copy_bandwidth_gb_s"], result["weight_gb"]
    one, three = rows
    assert one["kv_gb_per_step"] == 0 and one["floor_tokens_per_s"] == pytest.approx(bw / weights)
    assert three["kv_gb_per_step"] > 0
    assert three["floor_tokens_per_s"] == pytest.approx(3 * bw / (weights + three["kv_gb_per_step"]))
    for r in rows:
        assert r["decode_tokens_per_s"] > 0
        assert r["fraction_of_floor"] == pytest.approx(r["decode_tokens_per_s"] / r["floor_tokens_per_s"])
    assert result["fraction_of_floor"] == one["fraction_of_floor"]      # batch 1 stays at the top level
    table = proc.stdout.splitlines()
    assert len([line for line in table if line.startswith("qwen2.5-0.5b")]) == 2, proc.stdout
