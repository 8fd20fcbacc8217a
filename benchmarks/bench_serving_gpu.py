"""Served throughput and latency at several concurrencies, in one run: starts `anyserve serve`,
waits for /health, runs `anyserve bench serving` (native /generate, streaming, ignore_eos) at each
max concurrency with its own number of prompts, prints one table, writes one JSON, stops the server.

    python benchmarks/bench_serving_gpu.py --model-path DIR --load-format dummy \
        [--concurrency 1,16,64 --num-prompts 8,64,256] [--dataset random|sharegpt-synthetic] \
        [--server-arg KEY=VALUE ...] [--compare disable_overlap_schedule] [--output-file out.json]

Default workload: random prompts of exactly 1,024 tokens, 512 output tokens. With --compare FLAG a
second server runs with that boolean ServerArgs field toggled, and the table adds the ratio of
output throughput (default / toggled) at each concurrency. The cache is flushed before each level
and each level has its own prompts, so no level reuses another's prefixes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.bench.offline import (compare_variants, environment_info, server_arg_overrides,  # noqa: E402
                                  server_cli_flags)

# What one level keeps in the JSON (bench serving's per-request lists stay out).
LEVEL_KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
              "request_throughput", "output_throughput", "total_token_throughput", "concurrency",
              "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
              "mean_tpot_ms", "median_tpot_ms", "mean_e2e_latency_ms", "dataset_input_len", "dataset_output_len")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="Checkpoint folder (config-only with --load-format dummy)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="Server --dtype (default: the server's, auto)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="Any ServerArgs field, e.g. mem_fraction_static=0.85 (repeatable)")
    p.add_argument("--compare", default=None, metavar="FLAG",
                   help="A boolean ServerArgs field: run a second server with it toggled, report the ratio")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="Max concurrencies (default 1,16,64)")
    p.add_argument("--num-prompts", type=_int_list, default=[8, 64, 256],
                   help="Prompts at each concurrency, same order (default 8,64,256)")
    p.add_argument("--dataset", choices=["random", "sharegpt-synthetic"], default="random")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=512)
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="1.0: fixed lengths (default); r < 1: uniform in [len * r, len]")
    p.add_argument("--sharegpt-context-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1, help="Level i uses seed + i (default 1)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds to wait for /health")
    p.add_argument("--log-dir", default=None, help="Server logs go here (default: next to --output-file)")
    p.add_argument("--output-file", default=None)
    args = p.parse_args(argv)
    if len(args.concurrency) != len(args.num_prompts):
        p.error(f"--concurrency has {len(args.concurrency)} values and --num-prompts {len(args.num_prompts)}; "
                "give one number of prompts per concurrency")
    try:
        args.variants = compare_variants(args.compare, server_arg_overrides(args.server_arg))
    except ValueError as e:
        p.error(str(e))
    return args


# ---- the server -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `anyserve serve` subprocess in its own session, logging to a file."""

    def __init__(self, args: argparse.Namespace, flags: list[str], log_path: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "engine.entrypoints.cli", "serve", "--model-path", args.model_path,
                    "--device", args.device, "--load-format", args.load_format, "--host", "127.0.0.1",
                    "--port", str(self.port), "--grpc-port", "0",
                    *(["--dtype", args.dtype] if args.dtype else []), *flags]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "<no log>"

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {self.proc.returncode} while starting "
                                       f"({' '.join(self.cmd)}); log tail:\n{self.log_tail()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(1.0)
        raise TimeoutError(f"the server did not answer /health within {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def get(self, path: str) -> Any:
        return httpx.get(self.base_url + path, timeout=30.0, trust_env=False).json()

    def flush_cache(self) -> None:
        r = httpx.post(self.base_url + "/flush_cache", timeout=30.0, trust_env=False)
        if r.status_code != 200:
            print(f"warning: /flush_cache answered {r.status_code}: {r.text[:200]}", flush=True)

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM and wait (the server shuts its scheduler down); SIGKILL its process group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"warning: the server did not stop within {timeout:.0f}s; killing its process group",
                      flush=True)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


# ---- the run --------------------------------------------------------------------------------
def run_level(server: Server, args: argparse.Namespace, index: int) -> dict[str, Any]:
    from engine.bench.serving import bench_serving_args, run_bench_serving

    concurrency, num_prompts = args.concurrency[index], args.num_prompts[index]
    server.flush_cache()
    bargs = bench_serving_args(
        backend="anyserve", base_url=server.base_url, tokenizer=args.model_path, dataset=args.dataset,
        num_prompts=num_prompts, random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, sharegpt_context_len=args.sharegpt_context_len,
        max_concurrency=concurrency, seed=args.seed + index, disable_tqdm=True, warmup_requests=1)
    print(f"--- concurrency {concurrency}, {num_prompts} prompts ---", flush=True)
    result = run_bench_serving(bargs)
    return {"max_concurrency": concurrency, "num_prompts": num_prompts, **{k: result[k] for k in LEVEL_KEYS}}


def run_server(args: argparse.Namespace, label: str, overrides: dict[str, Any], log_dir: str) -> dict[str, Any]:
    flags = server_cli_flags(overrides)
    log_path = os.path.join(log_dir, f"server-{label.replace('=', '-')}.log")
    print(f"=== server {label}: {' '.join(flags) or '(defaults)'}; log {log_path} ===", flush=True)
    t0 = time.perf_counter()
    server = Server(args, flags, log_path)
    try:
        server.wait_healthy(args.startup_timeout)
        startup = time.perf_counter() - t0
        info = server.get("/get_server_info")
        levels = [run_level(server, args, i) for i in range(len(args.concurrency))]
    finally:
        code = server.stop()
    if code not in (0, None):
        print(f"warning: the server exited with code {code}; log tail:\n{server.log_tail()}", flush=True)
    return {"label": label, "flags": flags, "server_args": overrides, "startup_seconds": startup,
            "scheduler_info": info.get("scheduler_info"), "exit_code": code, "levels": levels}


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = args.log_dir or (os.path.dirname(os.path.abspath(args.output_file)) if args.output_file
                               else tempfile.mkdtemp(prefix="anyserve-bench-serving-"))
    os.makedirs(log_dir, exist_ok=True)
    result: dict[str, Any] = {
        "model_path": args.model_path, "device": args.device, "load_format": args.load_format,
        "dataset": args.dataset, "environment": environment_info(),
        "workload": {"random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
                     "random_range_ratio": args.random_range_ratio, "seed": args.seed}
        if args.dataset == "random" else {"sharegpt_context_len": args.sharegpt_context_len, "seed": args.seed},
        "servers": [run_server(args, label, overrides, log_dir) for label, overrides in args.variants],
    }
    if args.compare:
        base, other = result["servers"]
        result["compare"] = {"flag": args.variants[0][0].split("=")[0], "ratios": [
            {"max_concurrency": a["max_concurrency"],
             "output_throughput_ratio": a["output_throughput"] / max(b["output_throughput"], 1e-9)}
            for a, b in zip(base["levels"], other["levels"])]}
    print(format_table(result))
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


def format_table(r: dict[str, Any]) -> str:
    rows = [("server", "conc", "prompts", "ok", "out tok/s", "req/s", "TTFT mean/med/p99 ms",
             "ITL mean/med/p99 ms")]
    for srv in r["servers"]:
        for lv in srv["levels"]:
            rows.append((srv["label"], str(lv["max_concurrency"]), str(lv["num_prompts"]),
                         f"{lv['completed']}/{lv['completed'] + lv['failed']}", f"{lv['output_throughput']:.1f}",
                         f"{lv['request_throughput']:.2f}",
                         f"{lv['mean_ttft_ms']:.1f}/{lv['median_ttft_ms']:.1f}/{lv['p99_ttft_ms']:.1f}",
                         f"{lv['mean_itl_ms']:.2f}/{lv['median_itl_ms']:.2f}/{lv['p99_itl_ms']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if "compare" in r:
        a, b = r["servers"][0]["label"], r["servers"][1]["label"]
        lines.append(f"output tok/s ratio {a} / {b}: " + ", ".join(
            f"c={x['max_concurrency']}: {x['output_throughput_ratio']:.2f}x" for x in r["compare"]["ratios"]))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one line per request otherwise

    def on_term(signum: int, frame: Any) -> None:      # so that `finally` stops the server
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return run(args)


if __name__ == "__main__":
    main()
