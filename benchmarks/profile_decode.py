"""Where one decode step's device time goes, kernel by kernel.

    python benchmarks/profile_decode.py MODEL_DIR [--batch-size 1 [64 ...]] [--prompt-len 512] [--steps 64]
                                                  [--server-arg KEY=VALUE ...] [--output-file out.json]

For each ``--batch-size``, runs that many requests (random prompts, greedy, ignore_eos) through the
offline Engine with dummy weights, profiles ``--steps`` decode steps with torch.profiler (kernels
launched from captured graphs are recorded one by one), and prints each kernel's device time per
decode step next to the wall time per step: their difference is what the device spends idle
between kernels. Both figures are differences of two runs that differ only in their number of
decode steps, so the prefill's kernels cancel out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _short(name: str) -> str:
    """A kernel's name without template arguments: cuBLAS and Triton names run to hundreds of chars."""
    name = name.split("<")[0].split("(")[0]
    return name[:80]


def main() -> None:
    from engine.bench.offline import parse_server_arg
    from engine.entrypoints.engine import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1],
                   help="decode batch sizes, each profiled in turn in the same engine")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="Decode steps profiled (default: 64).")
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    kw = dict(parse_server_arg(a) for a in args.server_arg)
    engine = Engine(model_path=args.model_path, load_format="dummy", log_level="warning", **kw)
    n = args.steps
    results = [_profile_batch(engine, bs, args.prompt_len, n, args.top) for bs in args.batch_size]
    engine.shutdown()
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"prompt_len": args.prompt_len, "steps": n, "server_args": kw, "batches": results}, f,
                      indent=1)


def _profile_batch(engine, bs: int, prompt_len: int, n: int, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    vocab = min(30000, engine.scheduler.runner.vocab_size - 100)
    prompts = [[(i * 7919 + j * 31) % vocab + 100 for j in range(prompt_len)] for i in range(bs)]
    warm = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=warm)

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run(new_tokens: int) -> float:
        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        engine.flush_cache()
        sync()
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        sync()
        return time.perf_counter() - t0

    # decode time per step: the difference of two runs that differ only in their decode steps; the
    # kernels are profiled the same way, so prefill's kernels (the same in both runs) cancel out
    short, long_ = run(2), run(2 + n)
    step_ms = 1e3 * (long_ - short) / n
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for sign, new_tokens in ((-1, 2), (1, 2 + n)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(new_tokens)
        for e in prof.events():
            t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)
            if e.device_type.name != "CUDA" or t <= 0:
                continue
            row = per_kernel[_short(e.name)]
            row[0] += sign * t
            row[1] += sign
    engine.flush_cache()

    rows = sorted(((t / 1e3 / n, c / n, k) for k, (t, c) in per_kernel.items() if c > 0), reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"batch {bs}, prompt {prompt_len}: decode step {step_ms:.3f} ms wall "
          f"({bs / step_ms * 1e3:.1f} tok/s); kernels {busy:.3f} ms per decode step "
          f"({100 * busy / step_ms:.0f}% busy)")
    print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for t, c, k in rows[:top]:
        print(f"{t:8.4f} {100 * t / busy:5.1f}% {c:10.1f}  {k}")
    return {"batch_size": bs, "step_ms": step_ms, "kernel_ms_per_step": busy,
            "kernels": [{"name": k, "ms_per_step": t, "calls_per_step": c} for t, c, k in rows]}


if __name__ == "__main__":
    main()
