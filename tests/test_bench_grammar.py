"""benchmarks/bench_grammar.py on the CPU: every mode (free, json, one-json) with the overlap
scheduler on and off, each request stopping at exactly --output-len tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_grammar_runs_every_mode_with_overlap_on_and_off(tmp_path):
    out = tmp_path / "grammar.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_grammar.py", "--shape", "qwen2.5-0.5b", "--device", "cpu",
                           "--batch-sizes", "3", "--prompt-len", "8", "--output-len", "5", "--overlap-ab",
                           "--output-file", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
