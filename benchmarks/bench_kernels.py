"""Triton paged attention against the torch reference backend at Llama-3.1-8B's attention shapes
(32 q heads, 8 KV heads, head dim 128, bf16) on one GPU: decode and extend, batch 1/16/64,
context 512/4096. Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/bench_kernels.py --out bench_kernels.json
        [--kv-cache-dtypes auto fp8_e4m3] [--modes decode] [--batch-sizes 256 512] [--contexts 1280]

Decode: one new token per request over a context of C tokens (KV bytes read / time = GB/s).
Extend: 512 new tokens per request after C - 512 cached ones (a whole prompt when C = 512).
Decode and extend tile variants are timed too, to tune the platform's KernelConfig. Each KV cache
dtype (``--kv-cache-dtype``'s names) gets its own rows: an fp8 pool reads half the bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform as host
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_kernels")

HQ, HKV, D = 32, 8, 128
NEW_TOKENS = 512
DEVICE = "cuda"  # ROCm builds of torch call their GPUs "cuda" too


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def make_case(mode: str, batch_size: int, context: int, page_size: int, dtype: torch.dtype, device,
              kv_dtype: torch.dtype):
    """Pool, req_to_token with shuffled pages, and a ForwardBatch plus q/k/v for one step."""
    from engine.mem_cache.kv_pool import KVPool
    from engine.runner.forward_batch import ForwardBatch, ForwardMode

    g = torch.Generator(device=device).manual_seed(0)
    pages_per_req = -(-context // page_size)
    num_pages = batch_size * pages_per_req + 1
    pool = KVPool(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=kv_dtype, device=device,
                  num_pages=num_pages, page_size=page_size)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.copy_(torch.randn(buf.shape, device=device, generator=g).to(kv_dtype))
    pages = torch.randperm(num_pages, device=device, generator=g)[: batch_size * pages_per_req]
    pages = pages.view(batch_size, pages_per_req)
    pos = torch.arange(context, device=device)
    req_to_token = (pages[:, pos // page_size] * page_size + pos % page_size).int()   # [B, context]
    new = 1 if mode == "decode" else min(NEW_TOKENS, context)
    prefix = context - new
    t = batch_size * new
    rows = torch.arange(batch_size, device=device)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND, batch_size=batch_size,
        input_ids=torch.zeros(t, dtype=torch.int64, device=device),
        positions=torch.zeros(t, dtype=torch.int64, device=device), req_pool_indices=rows,
        seq_lens=torch.full((batch_size,), context, device=device),
        out_cache_loc=req_to_token[:, prefix:].reshape(-1).long(), seq_lens_cpu=[context] * batch_size,
        extend_prefix_lens=torch.full((batch_size,), prefix, device=device),
        extend_seq_lens=torch.full((batch_size,), new, device=device),
        extend_prefix_lens_cpu=[prefix] * batch_size, extend_seq_lens_cpu=[new] * batch_size)
    qkv = [torch.randn(t, h, D, device=device, generator=g).to(dtype) for h in (HQ, HKV, HKV)]
    return pool, req_to_token, batch, qkv


def build(name: str, pool, req_to_token, page_size, dtype, device, kernel_config=None):
    from hal.registry import entries

    kw = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_pool=pool, req_to_token=req_to_token,
              page_size=page_size, dtype=dtype, device=device)
    if kernel_config is not None:
        kw["kernel_config"] = kernel_config
    return entries("attention")[name].factory(**kw)


def time_step(backend, batch, qkv) -> tuple[float, torch.Tensor]:
    """Median ms of init_forward_metadata + forward (one layer), and the output."""
    from triton.testing import do_bench

    q, k, v = qkv

    def step():
        backend.init_forward_metadata(batch)
        return backend.forward(q, k, v, 0, D ** -0.5, batch)

    out = step()
    ms = do_bench(step, warmup=10, rep=50, return_mode="median")
    return ms, out


def timed(label: str, backend_fn, batch, qkv):
    """(ms, out), or (None, None) with the error logged: one failing case must not stop the run."""
    try:
        return time_step(backend_fn(), batch, qkv)
    except Exception as e:  # noqa: BLE001 - e.g. the torch baseline running out of memory
        logger.error("%s failed: %s: %s", label, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        torch.cuda.empty_cache()
        return None, None


DECODE_TILES = ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 4, 3))
EXTEND_TILES = ((64, 64, 4), (128, 64, 8), (128, 32, 4))


def bench_case(mode: str, bs: int, ctx: int, page_size: int, dtype, device, base_cfg, kv_name: str,
               kv_dtype) -> dict:
    pool, r2t, batch, qkv = make_case(mode, bs, ctx, page_size, dtype, device, kv_dtype)
    label = f"{mode} kv={kv_name} bs={bs} ctx={ctx}"
    torch_ms, ref = timed(f"torch {label}", lambda: build("torch", pool, r2t, page_size, dtype, device), batch, qkv)
    triton_ms, out = timed(f"triton {label}", lambda: build("triton", pool, r2t, page_size, dtype, device),
                           batch, qkv)
    row = dict(mode=mode, kv_cache_dtype=kv_name, batch=bs, context=ctx, torch_ms=torch_ms, triton_ms=triton_ms,
               speedup=torch_ms / triton_ms if torch_ms and triton_ms else None,
               max_abs_err=(out.float() - ref.float()).abs().max().item() if out is not None and ref is not None
               else None)
    if mode == "decode" and triton_ms:
        kv_bytes = 2 * bs * ctx * HKV * D * pool.k_buffers[0].element_size()
        row["triton_kv_gbps"] = kv_bytes / (triton_ms * 1e-3) / 1e9
    tiles = {}
    if mode == "decode":
        for bn, warps, stages in DECODE_TILES:
            cfg = dataclasses.replace(base_cfg, decode_block_n=bn, decode_num_warps=warps, decode_num_stages=stages)
            backend = build("triton", pool, r2t, page_size, dtype, device, cfg)
            key = f"n{backend.decode_block_n}w{warps}s{backend.decode_stages}"   # as launched (fp8: twice n)
            if key not in tiles:
                tiles[key] = timed(f"triton {label} tiles {key}", lambda: backend, batch, qkv)[0]
    else:
        for bm, bn, warps in EXTEND_TILES:
            cfg = dataclasses.replace(base_cfg, extend_block_m=bm, extend_block_n=bn, extend_num_warps=warps)
            tiles[f"{bm}x{bn}w{warps}"] = timed(
                f"triton {label} tiles {bm}x{bn}w{warps}",
                lambda: build("triton", pool, r2t, page_size, dtype, device, cfg), batch, qkv)[0]
    row["triton_tiles_ms"] = tiles
    logger.info("%s: torch %s ms, triton %s ms", label, _fmt(torch_ms), _fmt(triton_ms))
    return row


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def run(args) -> dict:
    import hal

    device = torch.device(DEVICE)
    dtype = torch.bfloat16
    platform = hal.get_platform("auto")
    base_cfg = platform.kernel_config()
    rows = []
    for kv_name in args.kv_cache_dtypes:
        kv_dtype = platform.kv_cache_dtype(kv_name, dtype)
        for mode in args.modes:
            for bs in args.batch_sizes:
                for ctx in args.contexts:
                    rows.append(bench_case(mode, bs, ctx, args.page_size, dtype, device, base_cfg, kv_name,
                                           kv_dtype))
                    torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), platform=platform.name, commit=_commit(),
                torch=torch.__version__, triton=__import__("triton").__version__, python=host.python_version(),
                shape=dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16",
                           page_size=args.page_size, extend_new_tokens=NEW_TOKENS),
                kernel_config=dataclasses.asdict(base_cfg), timing="triton.testing.do_bench median, "
                "init_forward_metadata + forward of one layer (includes the KV store)", results=rows)


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['platform']}), commit {report['commit']}, torch {report['torch']}, "
          f"triton {report['triton']}; Llama-3.1-8B attention: {HQ} q heads, {HKV} KV heads, head dim {D}, "
          f"bf16, page size {report['shape']['page_size']}")
    print(f"{'mode':<7}{'KV':<10}{'batch':>6}{'context':>9}{'torch ms':>11}{'triton ms':>11}{'speedup':>9}"
          f"{'KV GB/s':>9}{'max err':>10}  tiles (ms)")
    for r in report["results"]:
        tiles = " ".join(f"{k}={_fmt(v)}" for k, v in r.get("triton_tiles_ms", {}).items())
        print(f"{r['mode']:<7}{r['kv_cache_dtype']:<10}{r['batch']:>6}{r['context']:>9}"
              f"{_fmt(r['torch_ms']):>11}{_fmt(r['triton_ms']):>11}"
              f"{_fmt(r['speedup'], '.2f') + 'x':>9}{_fmt(r.get('triton_kv_gbps'), '.0f'):>9}"
              f"{_fmt(r['max_abs_err'], '.2e'):>10}  {tiles}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/bench_kernels.json", help="JSON results file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=("decode", "extend"), default=["decode", "extend"])
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], metavar="NAME",
                        help="KV pool dtypes, as --kv-cache-dtype names them (default: auto, the model's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA/ROCm GPU visible to torch; run it on the GPU machine")
    started = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['wall_seconds']} s)")
    failed = [r for r in report["results"] if r["triton_ms"] is None]
    if failed:
        sys.exit(f"bench_kernels: the Triton backend failed in {len(failed)} case(s); see the log above")


if __name__ == "__main__":
    main()
