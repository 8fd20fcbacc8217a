"""The Triton fused MoE (backends/triton/fused_moe.py) against the reference (LayerOps.fused_moe of
the torch layer ops: one matmul pair per busy expert, after reading the counts back) at real
expert shapes, bf16, on one GPU. Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/bench_fused_moe.py [--shapes mixtral-8x7b qwen3-30b-a3b]
        [--num-tokens 1 16 256 2048] [--output-file out.json]

Each row: the reference's ms, the Triton kernel's ms eagerly and replayed from a CUDA graph (the
way decode runs it), the ratios, and the achieved GB/s of the expert weights the routing touches
(each busy expert's w13 and w2 once: the floor of a decode step's MoE layer is those bytes over
the copy bandwidth). Routing: each token's top-k of random logits (a uniform router).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform as host
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_fused_moe")

DEVICE = "cuda"  # ROCm builds of torch call their GPUs "cuda" too
# (experts, top_k, hidden, intermediate) of one MoE layer
SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def make_case(shape: str, num_tokens: int, dtype: torch.dtype, g: torch.Generator):
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], and a router's top-k weights (float32) and ids."""
    num_experts, top_k, hidden, inter = SHAPES[shape]
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=g) / inter ** 0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, w13, w2, weights, ids.int()


def expert_bytes(w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor) -> int:
    """Bytes of the experts the routing touches, each read once (w13 and w2)."""
    busy = torch.unique(ids).numel()
    return busy * (w13[0].numel() + w2[0].numel()) * w13.element_size()


def time_ms(fn, graph: bool) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_case(shape: str, num_tokens: int, dtype: torch.dtype, triton_ops, torch_ops) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x, w13, w2, weights, ids = make_case(shape, num_tokens, dtype, g)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    out = triton_ops.fused_moe(x, w13, w2, weights, ids)
    row = dict(shape=shape, num_tokens=num_tokens,
               max_abs_err=(out.float() - ref.float()).abs().max().item(),
               ref_max_abs=ref.float().abs().max().item())
    for key, fn, graph in (("reference_ms", lambda: torch_ops.fused_moe(x, w13, w2, weights, ids), False),
                           ("triton_ms", lambda: triton_ops.fused_moe(x, w13, w2, weights, ids), False),
                           ("triton_graph_ms", lambda: triton_ops.fused_moe(x, w13, w2, weights, ids), True)):
        try:
            row[key] = time_ms(fn, graph)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the run
            logger.error("%s %s T=%d failed: %s: %s", key, shape, num_tokens, type(e).__name__,
                         str(e).splitlines()[0] if str(e) else "")
            row[key] = None
    ref_ms, ms, graph_ms = row["reference_ms"], row["triton_ms"], row["triton_graph_ms"]
    row["speedup"] = ref_ms / ms if ref_ms and ms else None
    row["speedup_graph"] = ref_ms / graph_ms if ref_ms and graph_ms else None
    row["expert_gb"] = expert_bytes(w13, w2, ids) / 1e9
    best = min(t for t in (ms, graph_ms) if t) if ms or graph_ms else None
    row["triton_gb_s"] = row["expert_gb"] / (best * 1e-3) if best else None
    row["reference_gb_s"] = row["expert_gb"] / (ref_ms * 1e-3) if ref_ms else None
    logger.info("%s T=%d: reference %s ms, triton %s ms (graph %s ms)", shape, num_tokens, _fmt(ref_ms),
                _fmt(ms), _fmt(graph_ms))
    del x, w13, w2
    torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    import hal
    from backends.cpu.torch_layer_ops import TorchLayerOps
    from backends.triton.layer_ops import TritonLayerOps

    device = torch.device(DEVICE)
    platform = hal.get_platform("auto")
    cfg = platform.kernel_config()
    triton_ops, torch_ops = TritonLayerOps(device=device), TorchLayerOps()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = [bench_case(shape, t, dtype, triton_ops, torch_ops) for shape in args.shapes for t in args.num_tokens]
    return dict(device=torch.cuda.get_device_name(), platform=platform.name, commit=_commit(),
                torch=torch.__version__, triton=__import__("triton").__version__, python=host.python_version(),
                dtype=args.dtype, shapes={s: dict(zip(("experts", "top_k", "hidden", "intermediate"), SHAPES[s]))
                                          for s in args.shapes},
                kernel_config={k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("moe_")},
                timing="triton.testing.do_bench median (eager), do_bench_cudagraph median (graph); one layer's "
                       "fused_moe including the alignment and the weighted sum", results=rows)


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['platform']}), commit {report['commit']}, torch {report['torch']}, "
          f"triton {report['triton']}, {report['dtype']}")
    print(f"{'shape':<15}{'T':>6}{'ref ms':>10}{'triton ms':>11}{'graph ms':>10}{'speedup':>9}{'graph':>8}"
          f"{'GB/s':>8}{'expert GB':>11}{'max err':>10}")
    for r in report["results"]:
        print(f"{r['shape']:<15}{r['num_tokens']:>6}{_fmt(r['reference_ms']):>10}{_fmt(r['triton_ms']):>11}"
              f"{_fmt(r['triton_graph_ms']):>10}{_fmt(r['speedup'], '.2f') + 'x':>9}"
              f"{_fmt(r['speedup_graph'], '.2f') + 'x':>8}{_fmt(r['triton_gb_s'], '.0f'):>8}"
              f"{_fmt(r['expert_gb'], '.3f'):>11}{_fmt(r['max_abs_err'], '.2e'):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--output-file", default=None, help="JSON results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe.py needs a CUDA or ROCm GPU (torch sees none)")
    report = run(args)
    print_table(report)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
