"""``anyserve bench serving``: load a running server with streaming requests and measure it.

Sends prompts (datasets.py) at a Poisson rate or all at once, bounded by --max-concurrency,
through the native /generate API or the OpenAI APIs, and reports throughput, time to first
token (TTFT), inter-token latency (ITL) and end-to-end latency; prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import numpy as np
from tqdm import tqdm

from engine.bench.datasets import DATASETS, BenchRequest, length_stats, random_requests, sample_requests

logger = logging.getLogger(__name__)


# ---- backends: the request body, and what a streamed chunk says ----------------------------------
@dataclass
class StreamState:
    text: str = ""                            # generated text so far
    completion_tokens: Optional[int] = None   # the server's count, when it sends one
    prompt_tokens: Optional[int] = None


class Backend:
    path: str

    def payload(self, req: BenchRequest, model: Optional[str]) -> dict[str, Any]:
        raise NotImplementedError

    def read_chunk(self, chunk: dict[str, Any], state: StreamState) -> bool:
        """Update state from one SSE chunk; True when it carried new output."""
        raise NotImplementedError


class NativeBackend(Backend):
    """SGLang-style /generate: token ids in, cumulative text and meta_info out."""
    path = "/generate"

    def payload(self, req: BenchRequest, model: Optional[str]) -> dict[str, Any]:
        return {"input_ids": req.prompt_ids, "stream": True,
                "sampling_params": {"max_new_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0}}

    def read_chunk(self, chunk: dict[str, Any], state: StreamState) -> bool:
        meta = chunk.get("meta_info") or {}
        state.prompt_tokens = meta.get("prompt_tokens", state.prompt_tokens)
        text = chunk.get("text", state.text)
        before = state.completion_tokens
        if "completion_tokens" in meta:
            state.completion_tokens = meta["completion_tokens"]
        elif "output_ids" in chunk:
            state.completion_tokens = len(chunk["output_ids"])
        grew = len(text) > len(state.text) or (state.completion_tokens or 0) > (before or 0)
        state.text = text
        return grew


class _OpenAIBackend(Backend):
    def read_chunk(self, chunk: dict[str, Any], state: StreamState) -> bool:
        usage = chunk.get("usage") or {}
        state.prompt_tokens = usage.get("prompt_tokens", state.prompt_tokens)
        state.completion_tokens = usage.get("completion_tokens", state.completion_tokens)
        choices = chunk.get("choices") or []
        delta = self.delta_text(choices[0]) if choices else ""
        state.text += delta
        return bool(delta)

    def delta_text(self, choice: dict[str, Any]) -> str:
        raise NotImplementedError

    def common(self, req: BenchRequest, model: Optional[str]) -> dict[str, Any]:
        return {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}


class CompletionsBackend(_OpenAIBackend):
    path = "/v1/completions"

    def payload(self, req: BenchRequest, model: Optional[str]) -> dict[str, Any]:
        return {**self.common(req, model), "prompt": req.prompt}

    def delta_text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""


class ChatBackend(_OpenAIBackend):
    path = "/v1/chat/completions"

    def payload(self, req: BenchRequest, model: Optional[str]) -> dict[str, Any]:
        return {**self.common(req, model), "messages": [{"role": "user", "content": req.prompt}]}

    def delta_text(self, choice: dict[str, Any]) -> str:
        return (choice.get("delta") or {}).get("content") or ""


BACKENDS: dict[str, Backend] = {"anyserve": NativeBackend(), "openai": CompletionsBackend(),
                                "openai-chat": ChatBackend()}


# ---- one request ----------------------------------------------------------------------------
@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0                                   # seconds, send -> first chunk with output
    itl: list[float] = field(default_factory=list)      # seconds between chunks with output
    latency: float = 0.0                                # seconds, send -> end of stream


@dataclass
class _Target:
    client: httpx.AsyncClient
    base_url: str
    backend: Backend
    model: Optional[str]
    headers: dict[str, str]
    tokenizer: Any


async def send_request(target: _Target, req: BenchRequest) -> RequestResult:
    """Stream one request; failures come back as a result with success False, never raise."""
    result = RequestResult(prompt_len=req.prompt_len)
    state = StreamState()
    start = last = time.perf_counter()
    got_output = False
    try:
        async with target.client.stream("POST", target.base_url + target.backend.path, headers=target.headers,
                                         json=target.backend.payload(req, target.model)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    result.error = f"error in stream: {json.dumps(chunk['error'])[:300]}"
                    return result
                if target.backend.read_chunk(chunk, state):
                    if got_output:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - start
                    got_output, last = True, now
        result.latency = time.perf_counter() - start
    except Exception as e:       # a failed request is a data point, not a crash
        result.error = f"{type(e).__name__}: {e}"
        return result
    if not got_output:
        result.error = "the stream ended without any output"
        return result
    result.success = True
    result.prompt_len = state.prompt_tokens or req.prompt_len
    result.output_len = (state.completion_tokens if state.completion_tokens is not None
                         else len(target.tokenizer.encode(state.text, add_special_tokens=False)))
    return result


# ---- the run --------------------------------------------------------------------------------
async def _arrivals(requests: list[BenchRequest], request_rate: float, seed: int):
    """Yield requests at Poisson arrivals of request_rate per second (all at once when inf)."""
    rng = np.random.default_rng(seed)
    for i, req in enumerate(requests):
        if i > 0 and math.isfinite(request_rate):
            await asyncio.sleep(rng.exponential(1.0 / request_rate))
        yield req


async def _run_all(target: _Target, requests: list[BenchRequest], args: argparse.Namespace
                   ) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            result = await send_request(target, req)
        else:
            async with limit:
                result = await send_request(target, req)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(req)) async for req in _arrivals(requests, args.request_rate, args.seed)]
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def arun_bench_serving(args: argparse.Namespace) -> dict[str, Any]:
    """run_bench_serving for callers already inside an event loop."""
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No pool limit beyond --max-concurrency: waiting for a connection would count as TTFT.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=30.0), trust_env=False,
                                 limits=limits) as client:
        tokenizer = _load_tokenizer(args.tokenizer or await _server_tokenizer_path(client, base_url, headers))
        model = args.model
        if model is None and args.backend != "anyserve":
            model = await _server_model_name(client, base_url, headers)
        target = _Target(client, base_url, BACKENDS[args.backend], model, headers, tokenizer)
        requests = sample_requests(args, tokenizer)
        await _warmup(target, tokenizer, args)
        logger.info("benchmarking %s%s with %d %s prompts, request rate %s, max concurrency %s",
                    base_url, target.backend.path, len(requests), args.dataset, args.request_rate,
                    args.max_concurrency or "unlimited")
        results, duration = await _run_all(target, requests, args)
    metrics = compute_metrics(results, duration)
    errors = Counter(r.error for r in results if not r.success)
    for error, count in errors.most_common(5):
        logger.warning("%d request(s) failed: %s", count, error)
    out = {
        "backend": args.backend, "base_url": base_url, "model": model, "dataset": args.dataset,
        "num_prompts": len(requests), "request_rate": _json_number(args.request_rate),
        "dataset_input_len": length_stats([r.prompt_len for r in requests]),
        "dataset_output_len": length_stats([r.output_len for r in requests]),
        "max_concurrency": args.max_concurrency, "seed": args.seed,
        **metrics,
        "errors": dict(errors.most_common(20)),
        "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results], "e2e_latencies": [r.latency for r in results],
    }
    return out


def run_bench_serving(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by args (see add_bench_serving_args), print the table,
    write --output-file, and return the results."""
    result = asyncio.run(arun_bench_serving(args))
    print(format_table(result))
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
        logger.info("wrote %s", args.output_file)
    return result


async def _warmup(target: _Target, tokenizer: Any, args: argparse.Namespace) -> None:
    if args.warmup_requests <= 0:
        return
    # Short prompts of their own, so the measured prompts' prefixes are not cached in advance.
    for req in random_requests(tokenizer, args.warmup_requests, 16, 8, 1.0, seed=args.seed + 1):
        result = await send_request(target, req)
        if not result.success:
            raise RuntimeError(f"warmup request to {target.base_url}{target.backend.path} failed: {result.error}. "
                               "Is the server up, and does --backend match it?")


async def _server_tokenizer_path(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    info = await _get_json(client, base_url + "/get_model_info", headers, "pass --tokenizer")
    path = info.get("tokenizer_path") or info.get("model_path")
    if not path:
        raise RuntimeError(f"{base_url}/get_model_info names no tokenizer_path or model_path; pass --tokenizer")
    return path


async def _server_model_name(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    models = await _get_json(client, base_url + "/v1/models", headers, "pass --model")
    try:
        return models["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model") from None


async def _get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str], hint: str) -> Any:
    try:
        resp = await client.get(url, headers=headers)
        resp.raise_for_status()
        return resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise RuntimeError(f"could not read {url} ({type(e).__name__}: {e}); is the server running? "
                           f"Or {hint}") from e


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load the tokenizer at {path!r} ({e}); pass --tokenizer with a "
                           "local copy of the server's tokenizer") from e


# ---- metrics --------------------------------------------------------------------------------
def _summary_ms(name: str, seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {f"{s}_{name}_ms": 0.0 for s in ("mean", "median", "std", "p90", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p90_{name}_ms": float(np.percentile(ms, 90)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate over the successful requests; duration is the benchmark's wall time (s)."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    duration = max(duration, 1e-9)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "concurrency": sum(r.latency for r in ok) / duration,     # mean requests in flight
        **_summary_ms("e2e_latency", [r.latency for r in ok]),
        **_summary_ms("ttft", [r.ttft for r in ok]),
        **_summary_ms("tpot", tpots),
        **_summary_ms("itl", [gap for r in ok for gap in r.itl]),
    }


def _json_number(x: float) -> Any:
    return x if math.isfinite(x) else str(x)


def format_table(m: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("Backend", m["backend"]), ("Dataset", m["dataset"]), ("Traffic request rate", m["request_rate"]),
        ("Max request concurrency", m["max_concurrency"] or "not set"),
        ("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
        ("Benchmark duration (s)", m["duration"]), ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", m["request_throughput"]),
        ("Input token throughput (tok/s)", m["input_throughput"]),
        ("Output token throughput (tok/s)", m["output_throughput"]),
        ("Total token throughput (tok/s)", m["total_token_throughput"]),
        ("Concurrency", m["concurrency"]),
    ]
    lines = [" Serving benchmark ".center(56, "=")]
    lines += [_row(label, value) for label, value in rows]
    for side in ("input", "output"):
        s = m.get(f"dataset_{side}_len")
        if s:
            lines.append(_row(f"Dataset {side} len mean/median/p90",
                              f"{s['mean']:.0f}/{s['median']:.0f}/{s['p90']:.0f}"))
    for title, key, short in (("End-to-end latency", "e2e_latency", "E2E"), ("Time to first token", "ttft", "TTFT"),
                              ("Time per output token (excl. 1st)", "tpot", "TPOT"),
                              ("Inter-token latency", "itl", "ITL")):
        lines.append(f" {title} ".center(56, "-"))
        lines += [_row(f"{label} {short} (ms)", m[f"{stat}_{key}_ms"])
                  for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99"))]
    lines.append("=" * 56)
    return "\n".join(lines)


def _row(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<42}{text:>14}"


# ---- /metrics -------------------------------------------------------------------------------
async def fetch_cache_hit_rate(base_url: str, api_key: Optional[str] = None, timeout: float = 10.0) -> float:
    """The server's ``anyserve:cache_hit_rate`` gauge (cached / all prompt tokens since start)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            resp = await client.get(base_url.rstrip("/") + "/metrics", headers=headers)
    except httpx.HTTPError as e:
        raise RuntimeError(f"could not read {base_url}/metrics ({type(e).__name__}: {e}); is the server "
                           "running?") from e
    if resp.status_code != 200:
        raise RuntimeError(f"GET {base_url}/metrics answered {resp.status_code}: {resp.text[:200]} "
                           "(is the server started with --enable-metrics?)")
    return metric_value(resp.text, "anyserve:cache_hit_rate")


def metric_value(exposition: str, name: str) -> float:
    """A metric's value from Prometheus text format (the mean when several label sets report it)."""
    from prometheus_client.parser import text_string_to_metric_families
    values = [s.value for family in text_string_to_metric_families(exposition)
              for s in family.samples if s.name == name]
    if not values:
        raise KeyError(f"metric {name!r} not found in /metrics output")
    return float(sum(values) / len(values))


# ---- command line ---------------------------------------------------------------------------
def add_bench_serving_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--backend", choices=sorted(BACKENDS), default="anyserve",
                        help="anyserve: native /generate with token ids; openai: /v1/completions; "
                             "openai-chat: /v1/chat/completions (all streaming). Default: anyserve")
    server.add_argument("--base-url", default=None, help="Server URL, e.g. http://127.0.0.1:30000 "
                        "(default: from --host and --port)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=30000)
    server.add_argument("--model", default=None, help="Model name for the OpenAI backends "
                        "(default: the first one /v1/models lists)")
    server.add_argument("--tokenizer", default=None, help="Tokenizer folder to build prompts with "
                        "(default: the tokenizer_path the server's /get_model_info reports)")
    server.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer <key>'")
    server.add_argument("--timeout", type=float, default=600.0,
                        help="Seconds to wait for each response chunk before failing the request. Default: 600")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS, default="random",
                      help="random: random lengths; generated-shared-prefix: groups sharing a system prompt; "
                           "sharegpt-synthetic: ShareGPT's published length statistics (datasets.SHAREGPT_FIT). "
                           "Default: random")
    data.add_argument("--num-prompts", type=int, default=1000, help="Prompts of the random and sharegpt-synthetic datasets. Default: 1000")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=1024)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths are drawn uniformly from [len * ratio, len]; 1.0 makes them fixed. Default: 0.0")
    data.add_argument("--sharegpt-context-len", type=int, default=2048,
                      help="sharegpt-synthetic keeps prompt + output <= this and prompt <= half of it, as the "
                           "ShareGPT benchmarks do with 2048. Default: 2048")
    data.add_argument("--gsp-num-groups", type=int, default=64, help="Shared system prompts. Default: 64")
    data.add_argument("--gsp-prompts-per-group", type=int, default=16, help="Questions per system prompt. Default: 16")
    data.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    data.add_argument("--gsp-question-len", type=int, default=128)
    data.add_argument("--gsp-output-len", type=int, default=256)
    data.add_argument("--seed", type=int, default=1, help="Seeds the prompts and the arrival times. Default: 1")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="Requests per second, arriving as a Poisson process; inf sends all at once. Default: inf")
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once")
    load.add_argument("--warmup-requests", type=int, default=1,
                      help="Short requests sent (and checked) before measuring. Default: 1")
    load.add_argument("--output-file", default=None, help="Write the results as JSON here")
    load.add_argument("--disable-tqdm", action="store_true", help="No progress bar")


def bench_serving_args(**overrides: Any) -> argparse.Namespace:
    """The command line's defaults with ``overrides`` (flag names with underscores), for callers
    that run the benchmark from Python: ``run_bench_serving(bench_serving_args(num_prompts=8))``."""
    parser = argparse.ArgumentParser()
    add_bench_serving_args(parser)
    args = parser.parse_args([])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown bench serving argument(s): {', '.join(unknown)}")
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="anyserve bench serving", description=__doc__)
    add_bench_serving_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_bench_serving(parser.parse_args(argv))


if __name__ == "__main__":
    main()
