"""``anyserve bench offline``: one workload through the offline Engine and through
transformers' ``generate`` in static batches, in one run; prints tokens/s and the ratio."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import time
from typing import Any, Optional

logger = logging.getLogger(__name__)


def add_bench_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None,
                   help="Checkpoint folder (default: the 'small' qwen2 model, made on first use in the cache).")
    p.add_argument("--device", default="auto", help="Device for both engines (default: auto).")
    p.add_argument("--dtype", default="bfloat16", help="dtype for both engines (default: bfloat16).")
    p.add_argument("--num-prompts", type=int, default=64, help="Requests in the workload (default: 64).")
    p.add_argument("--min-input-len", type=int, default=64, help="Shortest prompt, tokens (default: 64).")
    p.add_argument("--max-input-len", type=int, default=512, help="Longest prompt, tokens (default: 512).")
    p.add_argument("--output-len", type=int, default=128, help="Tokens generated per request (default: 128).")
    p.add_argument("--hf-batch-size", type=int, default=16,
                   help="Static batch size of the transformers baseline (default: 16).")
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="Run the baseline on only the first N prompts (when it is too slow); "
                        "tokens/s stays comparable.")
    p.add_argument("--skip-hf", action="store_true", help="Run only anyserve.")
    p.add_argument("--max-running-requests", type=int, default=None, help="Passed to anyserve.")
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="Passed to anyserve.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the prompt lengths and tokens (default: 0).")
    p.add_argument("--output-file", default=None, help="Write the results as JSON here.")


def make_workload(vocab_size: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Leave the first ids (special tokens in most tokenizers) out.
    return [[rng.randrange(10, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_anyserve(model_path: str, prompts: list[list[int]], output_len: int, args: argparse.Namespace) -> dict:
    from engine.entrypoints.engine import Engine

    kw: dict[str, Any] = {"dtype": args.dtype}
    if args.max_running_requests:
        kw["max_running_requests"] = args.max_running_requests
    if args.chunked_prefill_size:
        kw["chunked_prefill_size"] = args.chunked_prefill_size
    engine = Engine(model_path=model_path, device=args.device, log_level="warning", **kw)
    try:
        params = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
        engine.generate(input_ids=prompts[:2], sampling_params={**params, "max_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "requests": len(prompts), "retractions": stats.num_retractions}


def run_transformers(model_path: str, prompts: list[list[int]], output_len: int, batch_size: int,
                     device: str, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    pad = 0
    t0 = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
        out_tokens += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    return {"seconds": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "requests": len(prompts), "batch_size": batch_size}


def run_bench_offline(args: argparse.Namespace) -> dict:
    from engine.entrypoints.logging_setup import setup_logging
    from engine.models.config import read_vocab_size

    setup_logging("warning")
    model_path = args.model_path or _default_small_model(args.dtype)
    vocab = read_vocab_size(model_path)
    prompts = make_workload(vocab, args.num_prompts, args.min_input_len, args.max_input_len, args.seed)
    device = _resolve_device(args.device)
    result: dict[str, Any] = {
        "model_path": model_path, "device": device, "dtype": args.dtype, "num_prompts": args.num_prompts,
        "input_len": [args.min_input_len, args.max_input_len], "output_len": args.output_len,
    }
    print(f"workload: {args.num_prompts} requests, prompts {args.min_input_len}-{args.max_input_len} "
          f"tokens, {args.output_len} output tokens, ignore_eos, greedy; {device} {args.dtype}", flush=True)
    result["anyserve"] = run_anyserve(model_path, prompts, args.output_len, args)
    if not args.skip_hf:
        sub = prompts[: args.hf_num_prompts] if args.hf_num_prompts else prompts
        result["transformers"] = run_transformers(model_path, sub, args.output_len, args.hf_batch_size,
                                                  device, args.dtype)
        result["ratio"] = (result["anyserve"]["output_tokens_per_s"]
                           / result["transformers"]["output_tokens_per_s"])
    _print_table(result)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _resolve_device(device: str) -> str:
    import hal

    return hal.get_platform(device).device(0).type


def _default_small_model(dtype: str) -> str:
    from engine.models.make_model import cached_model_path

    return str(cached_model_path("qwen2", "small", dtype=dtype))


def _print_table(r: dict) -> None:
    rows = [("engine", "requests", "output tokens", "seconds", "output tok/s")]
    for name in ("anyserve", "transformers"):
        if name in r:
            x = r[name]
            rows.append((name, str(x["requests"]), str(x["output_tokens"]), f"{x['seconds']:.1f}",
                         f"{x['output_tokens_per_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if "ratio" in r:
        print(f"anyserve / transformers: {r['ratio']:.2f}x")
