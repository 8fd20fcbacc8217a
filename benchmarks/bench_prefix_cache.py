"""Shared-prefix serving: `anyserve bench serving --dataset generated-shared-prefix` against several
server configurations in one run (default: the radix cache on, then --disable-radix-cache).

    python benchmarks/bench_prefix_cache.py [--model-path DIR] [--output-file out.json]
    python benchmarks/bench_prefix_cache.py --config "dp1=" --config "dp2 round_robin=--dp 2 \
        --load-balance-method round_robin" --config "dp2 cache_aware=--dp 2 --load-balance-method cache_aware"

Default model: the `small` qwen2 checkpoint (Qwen2.5-0.5B's shape, random weights, bf16),
made in the cache on first use. Prints throughput of each, the ratio and the cache hit rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, port: int, extra: list[str], device: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.entrypoints.cli", "serve", "--model-path", model_path,
           "--device", device, "--port", str(port), "--grpc-port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_one(model_path: str, label: str, extra: list[str], args: argparse.Namespace) -> dict:
    extra = [*shlex.split(args.server_flags), *extra]
    from engine.bench.serving import bench_serving_args, fetch_cache_hit_rate, run_bench_serving
    import asyncio

    port = free_port()
    proc = start_server(model_path, port, extra, args.device)
    try:
        bargs = bench_serving_args(
            backend="anyserve", base_url=f"http://127.0.0.1:{port}", dataset="generated-shared-prefix",
            gsp_num_groups=args.groups, gsp_prompts_per_group=args.prompts_per_group,
            gsp_system_prompt_len=args.system_prompt_len, gsp_question_len=args.question_len,
            gsp_output_len=args.output_len, max_concurrency=args.max_concurrency, seed=args.seed,
            disable_tqdm=True, warmup_requests=1)
        print(f"--- {label} ---", flush=True)
        result = run_bench_serving(bargs)
        result["cache_hit_rate"] = asyncio.run(fetch_cache_hit_rate(f"http://127.0.0.1:{port}"))
    finally:
        stop_server(proc)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--groups", type=int, default=4, help="shared system prompts (default 4)")
    p.add_argument("--prompts-per-group", type=int, default=8, help="questions per system prompt (default 8)")
    p.add_argument("--system-prompt-len", type=int, default=1024, help="tokens (default 1024)")
    p.add_argument("--question-len", type=int, default=64, help="tokens (default 64)")
    p.add_argument("--output-len", type=int, default=32, help="tokens (default 32)")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", action="append", default=[], metavar="LABEL=FLAGS",
                   help="a server configuration to run (repeatable), e.g. 'dp2 cache_aware=--dp 2 "
                   "--load-balance-method cache_aware'; default: radix cache on, then off")
    p.add_argument("--server-flags", default="", help="flags for every server, e.g. '--load-format dummy'")
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    if args.model_path is None:
        from engine.models.make_model import cached_model_path

        args.model_path = str(cached_model_path("qwen2", "small", dtype="bfloat16"))
    configs = [c.split("=", 1) for c in args.config] or [["radix cache", ""],
                                                         ["no radix cache", "--disable-radix-cache"]]
    results = [(label, run_one(args.model_path, label, shlex.split(flags), args)) for label, flags in configs]
    base = results[0][1]["output_throughput"]
    rows = [("server", "req/s", "input tok/s", "output tok/s", "mean TTFT ms", "cache hit rate", "ratio")]
    for name, r in results:
        rows.append((name, f"{r['request_throughput']:.2f}", f"{r['input_throughput']:.0f}",
                     f"{r['output_throughput']:.1f}", f"{r['mean_ttft_ms']:.0f}", f"{r['cache_hit_rate']:.2%}",
                     f"{r['output_throughput'] / base:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"throughput ratios are against '{results[0][0]}'")
    if args.output_file:
        slim = {label: {m: v for m, v in r.items() if not isinstance(v, list)} for label, r in results}
        with open(args.output_file, "w") as f:
            json.dump({"workload": vars(args), **slim}, f, indent=2)

if __name__ == "__main__":
    main()
