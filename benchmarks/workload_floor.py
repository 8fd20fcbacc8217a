"""A lower bound on the time of an offline workload, from bandwidth and compute alone.

    python benchmarks/workload_floor.py --bandwidth-gb-s 4253 --tflops 700 [--dataset sharegpt-synthetic]

Every decode step reads all weights and the KV of every running request once, and does
2 x (matmul parameters) FLOPs per token; it can take no less than the larger of the two times.
Prefill does the same FLOPs per prompt token. Requests are all admitted at once (the offline
bench) and each decodes its output length, so the batch at step i is the requests with more than i
output tokens. Attention FLOPs, the LM head's share of prefill and every kernel's ramp are left
out, so real engines sit above this bound. Bandwidth: the device copy bandwidth measured by
bench_decode.py; compute: what dense bf16 GEMMs reach (about 650-700 TFLOPS on an H100/H200).
``--kv-cache-dtype fp8`` counts one byte per KV element (--kv-cache-dtype fp8_e4m3 / fp8_e5m2).

The second bound is for an engine that runs prompts inside decode steps (--enable-mixed-chunk), so
prefill FLOPs can hide under a step's weight reads: the run still takes at least as many steps as
the longest output (one prefill step, then one token per step), each reading all weights, plus every
KV read (the same total whatever the schedule), and at least the FLOPs of every prompt token and
every fed-back output token. A step takes at least the larger of its bytes and its FLOPs, so the run
takes at least the larger of the sums.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from bench_decode import SHAPES  # noqa: E402
from engine.bench.datasets import sharegpt_synthetic_lengths  # noqa: E402


def shape_sizes(cfg: dict, kv_bytes: int = 2) -> tuple[float, float, float]:
    """(weight bytes, matmul parameters per token, KV bytes per token) of a llama-like config, bf16
    weights and ``kv_bytes`` per KV element."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    weights = 2 * (n * per_layer + embed)
    matmul = n * per_layer + cfg["vocab_size"] * h
    return weights, matmul, 2 * kv_bytes * n * kv


def floor(input_lens: np.ndarray, output_lens: np.ndarray, cfg: dict, bandwidth: float, flops: float,
          kv_bytes: int = 2) -> dict:
    weights, matmul, kv_per_token = shape_sizes(cfg, kv_bytes)
    prefill = float(input_lens.sum()) * 2 * matmul / flops
    decode, kv_total, memory_bound_steps = 0.0, 0.0, 0
    for i in range(1, int(output_lens.max())):
        alive = output_lens > i
        kv = float(((input_lens + i) * alive).sum()) * kv_per_token
        mem, comp = (weights + kv) / bandwidth, int(alive.sum()) * 2 * matmul / flops
        decode += max(mem, comp)
        kv_total += kv
        memory_bound_steps += mem >= comp
    total = prefill + decode
    out_tokens = int(output_lens.sum())
    return {"prefill_s": prefill, "decode_s": decode, "total_s": total, "decode_steps": int(output_lens.max()) - 1,
            "memory_bound_steps": memory_bound_steps, "kv_read_tb": kv_total / 1e12,
            "output_tokens": out_tokens, "max_output_tok_s": out_tokens / total}


def mixed_floor(input_lens: np.ndarray, output_lens: np.ndarray, cfg: dict, bandwidth: float, flops: float,
                kv_bytes: int = 2) -> dict:
    """The bound for prompts mixed into decode steps (the module docstring's second bound)."""
    weights, matmul, kv_per_token = shape_sizes(cfg, kv_bytes)
    steps = int(output_lens.max())
    # request j reads contexts in_j + 1 .. in_j + out_j - 1, one per decode step
    kv = float(sum(((out - 1) * inp + out * (out - 1) // 2) for inp, out in
                   zip(input_lens.tolist(), output_lens.tolist()))) * kv_per_token
    rows = float(input_lens.sum() + (output_lens - 1).sum())
    memory_s, compute_s = (steps * weights + kv) / bandwidth, rows * 2 * matmul / flops
    total = max(memory_s, compute_s)
    return {"mixed_steps": steps, "mixed_memory_s": memory_s, "mixed_compute_s": compute_s,
            "mixed_total_s": total, "mixed_max_output_tok_s": float(output_lens.sum()) / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--bandwidth-gb-s", type=float, required=True, help="Measured device copy bandwidth.")
    p.add_argument("--tflops", type=float, default=700.0, help="Dense bf16 GEMM rate (default 700).")
    p.add_argument("--dataset", default="sharegpt-synthetic", choices=["sharegpt-synthetic", "random"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"],
                   help="KV element size: 2 bytes, or 1 (--kv-cache-dtype fp8_*).")
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    if args.dataset == "random":
        ins = np.full(args.num_prompts, args.random_input_len)
        outs = np.full(args.num_prompts, args.random_output_len)
    else:
        i, o = sharegpt_synthetic_lengths(args.num_prompts, args.seed)
        ins, outs = np.array(i), np.array(o)
    r = floor(ins, outs, SHAPES[args.shape], args.bandwidth_gb_s * 1e9, args.tflops * 1e12,
              kv_bytes=1 if args.kv_cache_dtype == "fp8" else 2)
    print(f"{args.dataset} x {args.num_prompts} on {args.shape}, {args.bandwidth_gb_s:,.0f} GB/s, "
          f"{args.tflops:,.0f} TFLOPS, {args.kv_cache_dtype} KV cache:")
    print(f"  prefill >= {r['prefill_s']:.2f} s, decode >= {r['decode_s']:.2f} s in {r['decode_steps']} steps "
          f"({r['memory_bound_steps']} memory-bound, {r['kv_read_tb']:.1f} TB of KV read)")
    print(f"  total >= {r['total_s']:.2f} s: at most {r['max_output_tok_s']:,.0f} output tok/s")
    m = mixed_floor(ins, outs, SHAPES[args.shape], args.bandwidth_gb_s * 1e9, args.tflops * 1e12,
                    kv_bytes=1 if args.kv_cache_dtype == "fp8" else 2)
    r.update(m)
    print(f"  prompts mixed into decode steps: >= {m['mixed_steps']} steps; weights + KV >= "
          f"{m['mixed_memory_s']:.2f} s, FLOPs >= {m['mixed_compute_s']:.2f} s: at most "
          f"{m['mixed_max_output_tok_s']:,.0f} output tok/s")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({**vars(args), **r}, f, indent=1)


if __name__ == "__main__":
    main()
