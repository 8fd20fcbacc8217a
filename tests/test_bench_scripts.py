"""Benchmark scripts on the CPU at tiny sizes: bench_decode.py gives one row per batch size, each with
the floor its docstring states (the weights, plus the batch's KV at the mean context from batch 2
on); bench_grammar.py runs every mode (free, json, one-json) with the overlap scheduler on and off,
each request stopping at exactly --output-len tokens; bench_speculative.py runs every workload with
speculative decoding off and on, with the same tokens in float32."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/NAME on the CPU at Qwen2.5-0.5B's shape (dummy weights), outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", "--shape", "qwen2.5-0.5b", "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_decode_reports_each_batch_size_against_its_floor(tmp_path):
    out = tmp_path / "decode.json"
    proc = run_script("bench_decode.py", "--prompt-len", "16", "--output-len", "6", "--batch-size", "1", "3",
                      "--output-file", str(out))
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


def test_bench_grammar_runs_every_mode_with_overlap_on_and_off(tmp_path):
    out = tmp_path / "grammar.json"
    proc = run_script("bench_grammar.py", "--batch-sizes", "3", "--prompt-len", "8", "--output-len", "5",
                      "--overlap-ab", "--output-file", str(out))
    rows = json.loads(out.read_text())["results"]
    by_key = {(r["mode"], r["overlap"]): r for r in rows}
    assert set(by_key) == {(m, o) for m in ("free", "json", "one-json") for o in (True, False)}
    for (mode, overlap), r in by_key.items():
        assert r["batch_size"] == 3 and r["decode_tokens_per_s"] > 0
        free = by_key[("free", overlap)]["decode_tokens_per_s"]
        assert r["vs_free"] == pytest.approx(r["decode_tokens_per_s"] / free)
        assert ("overlap_on_off" in r) == overlap
        assert (r["mask_ms"] > 0) == (mode != "free")
    assert len([line for line in proc.stdout.splitlines() if line.lstrip().startswith("3 ")]) == 6, proc.stdout


def test_bench_speculative_compares_off_and_on_per_workload(tmp_path):
    out = tmp_path / "spec.json"
    proc = run_script("bench_speculative.py", "--batch-sizes", "1,2", "--prompt-len", "16", "--output-len", "6",
                      "--dtype", "float32", "--output-file", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {(r["workload"], r["batch_size"]) for r in rows} == {
        (w, b) for w in ("repetitive", "repetitive-sampled", "non-repetitive") for b in (1, 2)}
    for r in rows:
        assert r["same_tokens"]           # float32: speculative decoding gives the same tokens
        assert r["speedup"] == pytest.approx(r["on"]["decode_tokens_per_s"] / r["off"]["decode_tokens_per_s"])
        assert r["off"]["accept_length"] == 1.0 and r["on"]["accept_length"] >= 1.0
        assert r["on"]["forward_steps"] <= r["off"]["forward_steps"]
        assert r["on"]["accepted_tokens"] <= r["on"]["draft_tokens"]
    assert "accept len" in proc.stdout


def test_bench_fused_moe_parses_its_arguments_and_asks_for_a_gpu():
    """The fused MoE benchmark is GPU-only: on the CPU its options parse, and a run says what it needs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = [sys.executable, "benchmarks/bench_fused_moe.py"]
    proc = subprocess.run([*script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--output-file" in proc.stdout and "qwen3-30b-a3b" in proc.stdout, proc.stderr
    import torch

    if torch.cuda.is_available():
        return                       # it would run (benchmarks/RESULTS.md records GPU runs)
    proc = subprocess.run([*script, "--shapes", "mixtral-8x7b", "--num-tokens", "1", "16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA or ROCm GPU" in proc.stderr, proc.stderr[-2000:]
