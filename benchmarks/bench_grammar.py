"""Decode throughput with a JSON schema against unconstrained decoding, same batch, one run.

    python benchmarks/bench_grammar.py [--batch-sizes 8,32] [--output-len 128] [--output-file out.json]
    python benchmarks/bench_grammar.py --shape llama-3.1-8b --device cuda --batch-sizes 1,32

For each batch size, the same prompts run twice through the offline Engine: unconstrained
(ignore_eos) and constrained by a schema whose documents are far longer than --output-len (an
array of 64 strings), so both stop at exactly --output-len tokens. Decode time is the time of
the full run minus that of a one-token run (the prefill, and for the schema its cached
compile), with the prefix cache flushed before each. Per decode step, it also reports the
scheduler's sampling time (for the schema: building the grammar mask, applying it, accepting
tokens) and the part spent building masks, which end-to-end noise on a shared host hides. Default model: the 'small' qwen2 checkpoint (Qwen2.5-0.5B's
shape, random weights). --shape builds a real model's config with dummy weights (see
bench_decode.py); its tokenizer is a small local one, so the grammar covers a small vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Far longer than any --output-len: every request stops on the length limit, as with ignore_eos.
LONG_SCHEMA = {"type": "array", "minItems": 64, "maxItems": 64,
               "items": {"type": "string", "minLength": 8, "maxLength": 16}}


class StepTimers:
    """Wraps scheduler methods and adds up their wall time and calls: the decode step, the
    sampling that follows the forward pass (mask building included), the mask building."""

    def __init__(self, scheduler: Any) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._wrap(scheduler, "_run_decode", "decode_step")
        self._wrap(scheduler, "_sample_and_process", "sample")
        if scheduler.grammar is not None:
            self._wrap(scheduler.grammar, "vocab_mask", "mask", count=lambda out: out[0] is not None)

    def _wrap(self, obj: Any, name: str, key: str, count=lambda out: True) -> None:
        inner = getattr(obj, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = inner(*a, **k)
            if count(out):
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
                self.calls[key] = self.calls.get(key, 0) + 1
            return out

        setattr(obj, name, timed)

    def ms(self, key: str) -> float:
        return 1e3 * self.seconds[key] / self.calls[key] if self.calls.get(key) else 0.0

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def timed_run(engine: Any, prompts: list[list[int]], params: dict) -> tuple[float, list[dict]]:
    engine.flush_cache()
    t = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t, outs


def measure(engine: Any, timers: StepTimers, prompts: list[list[int]], params: dict, output_len: int) -> dict:
    prefill_s, _ = timed_run(engine, prompts, {**params, "max_new_tokens": 1})
    timers.reset()
    total_s, outs = timed_run(engine, prompts, params)
    lengths = [o["meta_info"]["completion_tokens"] for o in outs]
    reasons = {o["meta_info"]["finish_reason"]["type"] for o in outs}
    assert reasons == {"length"} and set(lengths) == {output_len}, (reasons, set(lengths))
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"decode_s": decode_s, "decode_tokens_per_s": len(prompts) * (output_len - 1) / decode_s,
            "step_ms": timers.ms("decode_step"), "sample_ms": timers.ms("sample"), "mask_ms": timers.ms("mask")}


def model_folder(args: argparse.Namespace) -> tuple[str, bool]:
    if args.shape:
        from benchmarks.bench_decode import shape_folder

        return shape_folder(args.shape), True
    if args.model_path:
        return args.model_path, False
    from engine.models.make_model import cached_model_path

    return str(cached_model_path("qwen2", "small", dtype="bfloat16")), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--shape", default=None, help="a real model's shape with dummy weights (bench_decode.py)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per case; the fastest counts")
    p.add_argument("--output-file", default=None)
    args = p.parse_args()

    from engine import Engine

    folder, temporary = model_folder(args)
    kw: dict[str, Any] = {"dtype": args.dtype, "log_level": "warning"}
    if temporary:
        kw.update(load_format="dummy", context_length=args.prompt_len + args.output_len + 8)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    kw["max_running_requests"] = max(batch_sizes)
    engine = Engine(model_path=folder, device=args.device, **kw)
    results = []
    try:
        sched = engine.scheduler
        timers = StepTimers(sched)
        rng = random.Random(0)
        vocab = len(engine.tokenizer)
        schema = json.dumps(LONG_SCHEMA)
        modes = {"unconstrained": {"temperature": 0.0, "ignore_eos": True},
                 "json_schema": {"temperature": 0.0, "json_schema": schema}}
        engine.generate(input_ids=[[5, 6, 7]], sampling_params={**modes["json_schema"], "max_new_tokens": 4})
        for b in batch_sizes:
            prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(b)]
            row: dict[str, Any] = {"batch_size": b}
            for _ in range(args.repeats):      # modes alternate, so that drift hits both alike
                for mode, params in modes.items():
                    run = measure(engine, timers, prompts, {**params, "max_new_tokens": args.output_len},
                                  args.output_len)
                    if mode not in row or run["decode_tokens_per_s"] > row[mode]["decode_tokens_per_s"]:
                        row[mode] = run
            free, constrained = row["unconstrained"], row["json_schema"]
            row["overhead"] = 1 - constrained["decode_tokens_per_s"] / free["decode_tokens_per_s"]
            # what the grammar adds to a step on the host, against the whole unconstrained step
            row["sampling_overhead"] = (constrained["sample_ms"] - free["sample_ms"]) / free["step_ms"]
            results.append(row)
        info = {"model": args.shape or os.path.basename(folder.rstrip("/")),
                "device": sched.runner.platform.description(),
                "dtype": args.dtype, "model_vocab": sched.runner.vocab_size,
                "grammar_vocab": sched.grammar.backend.vocab_size, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "schema": LONG_SCHEMA, "results": results}
    finally:
        engine.shutdown()
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"{info['model']} on {info['device']}, {args.dtype}, grammar vocab {info['grammar_vocab']} "
          f"of {info['model_vocab']}, output {args.output_len} tokens")
    print(f"{'batch':>5} {'free tok/s':>11} {'json tok/s':>11} {'overhead':>9} {'free step ms':>12} "
          f"{'free sample':>11} {'json sample':>11} {'json mask':>9} {'sample overhead':>15}")
    for r in results:
        u, j = r["unconstrained"], r["json_schema"]
        print(f"{r['batch_size']:5d} {u['decode_tokens_per_s']:11.1f} {j['decode_tokens_per_s']:11.1f} "
              f"{r['overhead']:9.1%} {u['step_ms']:12.1f} {u['sample_ms']:11.2f} {j['sample_ms']:11.2f} "
              f"{j['mask_ms']:9.2f} {r['sampling_overhead']:15.1%}")
    print("overhead: 1 - json tok/s / free tok/s, end to end (noisy on a shared host); sample overhead: the "
          "json step's extra sampling time (mask, accept) over the free decode step; times in ms per step")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
