"""What the offline-Engine benchmarks (bench_grammar.py, bench_speculative.py) share: their model
and workload flags, the model folder (a real shape with dummy weights, a given checkpoint or the
'small' qwen2), the Engine's keyword arguments, and a timed generate with the prefix cache
flushed before it."""
from __future__ import annotations

import argparse
import time
from typing import Any


def add_engine_args(p: argparse.ArgumentParser, batch_sizes: str, prompt_len: int, output_len: int) -> None:
    p.add_argument("--model-path", default=None)
    p.add_argument("--shape", default=None, help="a real model's shape with dummy weights (bench_decode.py)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", default=batch_sizes)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--repeats", type=int, default=1, help="runs per case; the fastest counts")
    p.add_argument("--output-file", default=None)


def model_folder(args: argparse.Namespace) -> tuple[str, bool]:
    """The checkpoint folder, and whether it is a temporary shape folder (dummy weights)."""
    if args.shape:
        from benchmarks.bench_decode import shape_folder

        return shape_folder(args.shape), True
    if args.model_path:
        return args.model_path, False
    from engine.models.make_model import cached_model_path

    return str(cached_model_path("qwen2", "small", dtype="bfloat16")), False


def engine_kwargs(args: argparse.Namespace, temporary: bool) -> tuple[dict[str, Any], list[int]]:
    """The Engine's keyword arguments (besides model_path and device), and the batch sizes."""
    kw: dict[str, Any] = {"dtype": args.dtype, "log_level": "warning"}
    if temporary:
        kw.update(load_format="dummy", context_length=args.prompt_len + args.output_len + 8)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    kw["max_running_requests"] = max(batch_sizes)
    return kw, batch_sizes


def timed_run(engine: Any, prompts: list[list[int]], params: list[dict]) -> tuple[float, list[dict]]:
    """Seconds of one generate over ``prompts`` (prefix cache flushed first), and its outputs."""
    engine.flush_cache()
    t = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t, outs
