"""Tune the one-pass GEMM of 17-128 rows (backends/triton/skinny_gemm.py) against cuBLAS at
Llama-3.1-8B's projections (q/k/v, o, gate/up, down), each with the residual added as a decoder
layer adds it (cuBLAS: the in-place ``addmm_`` of LayerOps.linear).

For each projection and row count, every (block_n, block_k, k_per_split, num_warps, num_stages) of a
small grid is checked against cuBLAS's result and timed as one call per distinct copy of the weight
(enough copies that they do not fit in L2) in a device graph, so neither launch overhead nor cache
reuse is counted. Prints, per case, cuBLAS, the platform's configuration and the best one, and the
layer's sum for each row count; writes JSON.

    PYTHONPATH=. python benchmarks/sweep_skinny_gemm.py [--rows 32 64 128] [--output-file sweep.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GRID = dict(block_n=[64, 128], block_k=[64, 128], k_per_split=[2048, 4096, 8192, 16384], num_warps=[4, 8],
            num_stages=[3, 4])
L2_BYTES = 256 << 20


def main() -> None:
    from backends.triton.layer_ops import TritonLayerOps
    from backends.triton.skinny_gemm import skinny_gemm
    from bench_decode import copy_bandwidth
    from hal.platform import get_platform
    from sweep_decode_attention import time_graph

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[24, 32, 64, 128])
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(get_platform("cuda"), dev)
    platform_cfg = TritonLayerOps(dev).skinny_launch
    configs = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:,.0f} GB/s; platform config {platform_cfg}")
    results = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw / 1e9, "platform": platform_cfg,
               "cases": {}}
    layer = {m: {"cublas": 0.0, "platform": 0.0, "best": 0.0} for m in args.rows}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(max(4, -(-L2_BYTES // (n * k * 2))))]
        floor = n * k * 2 / bw * 1e6
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=dt)
            r = torch.randn(m, n, device=dev, dtype=dt)
            rs = r.clone()
            ref = torch.addmm(r, x, ws[0].T).float()
            cublas = time_graph(lambda i: rs.addmm_(x, ws[i].T), len(ws))

            def run(cfg):
                got = skinny_gemm(x, ws[0], residual=r, **cfg).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    raise SystemExit(f"{name} rows {m} {cfg}: relative error {err:.3g} against cuBLAS")
                return time_graph(lambda i: skinny_gemm(x, ws[i], residual=r, **cfg), len(ws))

            ours = run(platform_cfg)
            timed = sorted(((run(cfg), cfg) for cfg in configs), key=lambda tc: tc[0])
            best_t, best_cfg = timed[0]
            layer[m]["cublas"] += cublas
            layer[m]["platform"] += ours
            layer[m]["best"] += best_t
            print(f"{name:8} rows {m:4}: floor {floor:6.1f} µs, cuBLAS {cublas:6.1f} ({floor / cublas:4.0%}), "
                  f"platform {ours:6.1f} ({floor / ours:4.0%}, {cublas / ours:4.2f}x), best {best_t:6.1f} "
                  f"({cublas / best_t:4.2f}x) {best_cfg}", flush=True)
            results["cases"][f"{name}:{m}"] = dict(floor_us=floor, cublas_us=cublas, platform_us=ours,
                                                   best=[dict(us=t, **c) for t, c in timed[:5]])
    print("\nper layer (the four projections), µs:")
    for m, v in layer.items():
        print(f"  rows {m:4}: cuBLAS {v['cublas']:6.1f}, platform {v['platform']:6.1f} "
              f"({v['cublas'] / v['platform']:.3f}x), best per projection {v['best']:6.1f} "
              f"({v['cublas'] / v['best']:.3f}x)")
    results["layer_us"] = layer
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
