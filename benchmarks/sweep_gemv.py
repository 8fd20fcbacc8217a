"""Tune the Triton GEMV (backends/triton/gemv.py) against cuBLAS at Llama-3.1-8B's projections.

For each projection (q/k/v, o, gate/up, and down with SiLU-and-mul fused into its input) and a
grid of launch parameters -- (block_n, block_k, num_warps, num_stages) of the one-row kernel at 1
row, or with ``--kernel tile`` (tile_n, tile_k, tile_num_warps, tile_num_stages) of the several-row
tile kernel at ``--tune-rows`` rows -- time one call per distinct copy of the weight
(enough copies that they do not fit in L2, as 32 layers do not) in a device graph, so neither
launch overhead nor cache reuse is counted. The baseline, in the same run: F.linear (cuBLAS),
with the separate SiLU-and-mul kernel before the down projection.

    PYTHONPATH=. python benchmarks/sweep_gemv.py [--kernel row|tile] [--rows 1 2 4 8] [--output-file sweep.json]

Prints each projection's cuBLAS time, the best few configurations, the best single configuration
over all four (what KernelConfig can hold), and each of --rows at that configuration.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (N, K, silu_mul_input): Llama-3.1-8B, hidden 4096, 32 q / 8 KV heads of 128, MLP 14336
SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
          "down": (4096, 14336, True)}
GRIDS = {"row": dict(block_n=[4, 8, 16], block_k=[256, 512, 1024], num_warps=[2, 4, 8], num_stages=[3]),
         "tile": dict(tile_n=[16, 32, 64], tile_k=[128, 256, 512], tile_num_warps=[4, 8],
                      tile_num_stages=[3, 5])}
L2_BYTES = 256 << 20   # weights cycled per timing: well above any GPU's L2


def main() -> None:
    from backends.triton.gemv import ROW_KERNEL_MAX_ROWS, gemv
    from backends.triton.layer_ops import TritonLayerOps
    from bench_decode import copy_bandwidth
    from sweep_decode_attention import time_graph
    from hal.platform import get_platform

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=sorted(GRIDS), default="row",
                   help="row: the one-row kernel, tuned at 1 row; tile: the several-row kernel")
    p.add_argument("--tune-rows", type=int, default=None,
                   help="rows the configurations are timed at (default: 1 for row, 8 for tile)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="rows compared with cuBLAS at the best configuration (default: 1 2 4 8 for row, "
                        "where more than 1 row runs the platform's tile configuration; 2 4 8 16 32 64 for tile)")
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    grid = GRIDS[args.kernel]
    tune_rows = args.tune_rows or (1 if args.kernel == "row" else 8)
    args.rows = args.rows or ([1, 2, 4, 8] if args.kernel == "row" else [2, 4, 8, 16, 32, 64])
    dev, dtype = torch.device("cuda"), torch.bfloat16
    platform = get_platform("cuda")
    bw = copy_bandwidth(platform, dev)
    ops = TritonLayerOps(dev)
    base_launch = ops.gemv_launch          # the platform's, as the layer ops pass it; cfg overrides some
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:,.0f} GB/s")

    weights, inputs = {}, {}
    for name, (n, k, silu) in SHAPES.items():
        copies = max(4, -(-L2_BYTES // (n * k * 2)))
        weights[name] = [torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5 for _ in range(copies)]
        inputs[name] = {m: torch.randn(m, 2 * k if silu else k, device=dev, dtype=dtype)
                        for m in sorted(set(args.rows) | {tune_rows})}

    def run_gemv(x, w, silu, cfg):
        # as the layer ops call it: the tile kernel's rows take silu_and_mul's output
        if silu and x.shape[0] > ROW_KERNEL_MAX_ROWS:
            return gemv(ops.silu_and_mul(x), w, **{**base_launch, **cfg})
        return gemv(x, w, silu_mul_input=silu, **{**base_launch, **cfg})

    def check(name, m, cfg) -> float:
        n, k, silu = SHAPES[name]
        x, w = inputs[name][m], weights[name][0]
        got = run_gemv(x, w, silu, cfg).float()
        ref = F.linear((ops.silu_and_mul(x) if silu else x).float(), w.float())
        return ((got - ref).abs().max() / ref.abs().max()).item()

    def t_cublas(name, m) -> float:
        silu, x, ws = SHAPES[name][2], inputs[name][m], weights[name]
        return time_graph(lambda i: F.linear(ops.silu_and_mul(x) if silu else x, ws[i]), len(ws))

    def t_gemv(name, m, cfg) -> float:
        silu, x, ws = SHAPES[name][2], inputs[name][m], weights[name]
        return time_graph(lambda i: run_gemv(x, ws[i], silu, cfg), len(ws))

    def gbs(name, us) -> float:
        n, k, _ = SHAPES[name]
        return n * k * 2 / (us * 1e-6) / 1e9

    results = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw / 1e9, "kernel": args.kernel,
               "tune_rows": tune_rows, "shapes": {}}
    configs = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    table = {}
    for name in SHAPES:
        base = t_cublas(name, tune_rows)
        rows = []
        for cfg in configs:
            err = check(name, tune_rows, cfg)
            if err > 2e-2:
                raise SystemExit(f"{name} {cfg}: relative error {err:.3g} against the fp32 reference")
            rows.append((t_gemv(name, tune_rows, cfg), cfg))
        rows.sort(key=lambda r: r[0])
        table[name] = {tuple(c.values()): t for t, c in rows}
        floor = SHAPES[name][0] * SHAPES[name][1] * 2 / bw * 1e6
        print(f"\n{name} {SHAPES[name][:2]}: floor {floor:.1f} µs; cuBLAS {base:.1f} µs "
              f"({gbs(name, base):,.0f} GB/s, {floor / base:.0%})")
        for t, cfg in rows[:4]:
            print(f"  {t:7.1f} µs {gbs(name, t):7,.0f} GB/s {floor / t:5.0%}  {base / t:5.2f}x  {cfg}")
        results["shapes"][name] = dict(cublas_us=base, floor_us=floor,
                                       best=[dict(us=t, **cfg) for t, cfg in rows[:8]])

    key = min(table["qkv"], key=lambda c: sum(table[s][c] for s in SHAPES))
    cfg = dict(zip(grid, key))
    print(f"\nbest single configuration over the four projections: {cfg}")
    print(f"{'rows':>4} " + " ".join(f"{s + ' cuBLAS':>14} {s + ' gemv':>12}" for s in SHAPES) + "  layer ratio")
    results["single"] = dict(config=cfg, rows={})
    for m in args.rows:
        cb = {s: t_cublas(s, m) for s in SHAPES}
        gv = {s: t_gemv(s, m, cfg) for s in SHAPES}
        for s in SHAPES:
            err = check(s, m, cfg)
            if err > 2e-2:
                raise SystemExit(f"{s} rows {m}: relative error {err:.3g}")
        ratio = sum(cb.values()) / sum(gv.values())
        print(f"{m:>4} " + " ".join(f"{cb[s]:>11.1f} µs {gv[s]:>9.1f} µs" for s in SHAPES) + f"  {ratio:.2f}x")
        results["single"]["rows"][m] = dict(cublas_us=cb, gemv_us=gv, layer_speedup=ratio)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
