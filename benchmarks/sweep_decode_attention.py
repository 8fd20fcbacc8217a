"""Tune the Triton decode attention's launch parameters on this GPU: every (block_n, num_warps,
num_stages, min_split_tokens, max splits) in a small grid, at Llama-3.1-8B's heads, for a few
(batch, context) cases. Each timing replays a device graph of 20 calls, so launch overhead is not
counted (captured decode steps do not pay it either).

    PYTHONPATH=. python benchmarks/sweep_decode_attention.py [--output-file sweep.json]

Prints, per case, the platform's current setting and the best few, in µs per call and KV GB/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [(1, 512), (1, 2048), (8, 512), (64, 512), (64, 2048), (256, 512), (512, 256)]
GRID = dict(block_n=[32, 64, 128], num_warps=[2, 4, 8], num_stages=[1, 2, 3],
            min_split=[32, 64, 256], max_splits=[16, 32])
CALLS = 20


def time_graph(fn, calls: int = CALLS) -> float:
    """µs per call of fn(i) for i in range(calls), from one graph of all of them."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def main() -> None:
    from backends.triton.decode_attention import decode_attention, splits_for_batch
    from backends.triton.tl_helpers import fp32_dot
    from bench_kernels import D, HKV, HQ, make_case
    from hal.platform import get_platform

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-file", default=None)
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--mixed-lengths", action="store_true",
                   help="Instead: the split count alone, at the platform's tiles, for batches whose "
                        "contexts follow the ShareGPT-like lengths (uneven, as in serving).")
    args = p.parse_args()
    cfg = get_platform("cuda").kernel_config()
    dtype = torch.bfloat16
    if args.mixed_lengths:
        return sweep_split_counts(cfg, dtype, args.output_file)
    results = []
    for bs, ctx in CASES:
        pool, r2t, batch, (q, _, _) = make_case("decode", bs, ctx, 16, dtype, "cuda")
        kb, vb = pool.k_buffers[0], pool.v_buffers[0]
        out = torch.empty_like(q)
        scratch_o = torch.empty(bs * HQ * 32 * D, dtype=torch.float32, device="cuda")
        scratch_l = torch.empty(bs * HQ * 32, dtype=torch.float32, device="cuda")
        kv_bytes = 2 * bs * ctx * HKV * D * 2
        ref = None
        rows = []
        current = (cfg.decode_block_n, cfg.decode_num_warps, cfg.decode_num_stages, cfg.min_split_tokens,
                   cfg.max_kv_splits)
        combos = list(itertools.product(*GRID.values()))
        if current not in combos:
            combos.insert(0, current)
        for bn, nw, ns, ms, mx in combos:
            if bs >= 64 and (ms, mx) != (256, 16) and (bn, nw, ns, ms, mx) != current:
                continue   # one split per request there anyway: only the tile matters
            splits = splits_for_batch(bs, HKV, dataclasses.replace(cfg, max_kv_splits=mx))
            po = scratch_o[: bs * HQ * splits * D].view(bs, HQ, splits, D)
            pl = scratch_l[: bs * HQ * splits].view(bs, HQ, splits)

            def fn():
                decode_attention(q, kb, vb, out, r2t, batch.req_pool_indices, batch.seq_lens, po, pl,
                                 D ** -0.5, num_splits=splits, min_split_tokens=ms, block_n=bn,
                                 num_warps=nw, num_stages=ns, fp32_dot=fp32_dot(dtype))
            try:
                us = time_graph(lambda _: fn())
            except Exception as e:  # noqa: BLE001 - a tile that does not fit: skip it
                print(f"  skip bn={bn} nw={nw} ns={ns}: {type(e).__name__}")
                continue
            if ref is None:
                ref = out.clone()
            err = (out.float() - ref.float()).abs().max().item()
            rows.append({"batch": bs, "context": ctx, "block_n": bn, "num_warps": nw, "num_stages": ns,
                         "min_split": ms, "max_splits": mx, "splits": splits, "us": us,
                         "kv_gb_s": kv_bytes / us / 1e3, "max_err_vs_first": err,
                         "current": (bn, nw, ns, ms, mx) == current})
        rows.sort(key=lambda r: r["us"])
        cur = next(r for r in rows if r["current"])
        print(f"batch {bs} x context {ctx}: current {cur['us']:.1f} µs ({cur['kv_gb_s']:.0f} GB/s)")
        for r in rows[: args.top]:
            print(f"   {r['us']:7.1f} µs {r['kv_gb_s']:6.0f} GB/s  bn={r['block_n']} warps={r['num_warps']} "
                  f"stages={r['num_stages']} min_split={r['min_split']} max_splits={r['max_splits']} "
                  f"(splits {r['splits']}) err {r['max_err_vs_first']:.1e}")
        results.extend(rows)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=1)


def sweep_split_counts(cfg, dtype, output_file) -> None:
    """µs per call for every split count 1..max_kv_splits against the platform's choice, for
    batches of requests at uneven context lengths: each request's prompt plus a uniform share
    of its output, from the ShareGPT-like generator."""
    import numpy as np

    from backends.triton.decode_attention import decode_attention, splits_for_batch
    from backends.triton.tl_helpers import fp32_dot
    from bench_kernels import D, HKV, HQ, make_case
    from engine.bench.datasets import sharegpt_synthetic_lengths

    rng = np.random.default_rng(0)
    results = []
    for bs in (8, 16, 32, 64, 128, 256, 512):
        ins, outs = sharegpt_synthetic_lengths(bs, seed=bs)
        lens = [int(i + rng.integers(0, o + 1)) for i, o in zip(ins, outs)]
        pool, r2t, batch, (q, _, _) = make_case("decode", bs, max(lens), 16, dtype, "cuda")
        batch.seq_lens = torch.tensor(lens, device="cuda")
        kb, vb = pool.k_buffers[0], pool.v_buffers[0]
        out = torch.empty_like(q)
        kv_bytes = 2 * sum(lens) * HKV * D * 2
        chosen = splits_for_batch(bs, HKV, cfg)
        bn, stages = cfg.decode_tiles(D, 2)
        rows = []
        for splits in [s for s in (1, 2, 4, 8, 16, 32) if s <= 32]:
            po = torch.empty(bs, HQ, splits, D, dtype=torch.float32, device="cuda")
            pl = torch.empty(bs, HQ, splits, dtype=torch.float32, device="cuda")

            def fn():
                decode_attention(q, kb, vb, out, r2t, batch.req_pool_indices, batch.seq_lens, po, pl,
                                 D ** -0.5, num_splits=splits, min_split_tokens=cfg.min_split_tokens,
                                 block_n=bn, num_warps=cfg.decode_num_warps, num_stages=stages,
                                 fp32_dot=fp32_dot(dtype))
            us = time_graph(lambda _: fn())
            rows.append({"batch": bs, "mean_context": sum(lens) / bs, "max_context": max(lens), "splits": splits,
                         "us": us, "kv_gb_s": kv_bytes / us / 1e3, "chosen": splits == chosen})
        best = min(rows, key=lambda r: r["us"])
        cur = next(r for r in rows if r["chosen"])
        print(f"batch {bs:4d} (context mean {sum(lens) / bs:6.0f}, max {max(lens):5d}): chosen {chosen:2d} splits "
              f"{cur['us']:7.1f} µs ({cur['kv_gb_s']:5.0f} GB/s); best {best['splits']:2d} splits {best['us']:7.1f} µs "
              f"({best['kv_gb_s']:5.0f} GB/s); all: " + " ".join(f"{r['splits']}:{r['us']:.0f}" for r in rows))
        results.extend(rows)
    if output_file:
        with open(output_file, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
