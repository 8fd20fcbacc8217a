"""Where one decode step's device time goes, kernel by kernel.

    python benchmarks/profile_decode.py MODEL_DIR [--batch-size 1] [--prompt-len 512] [--steps 64]
                                                  [--server-arg KEY=VALUE ...] [--output-file out.json]

Runs ``--batch-size`` requests (random prompts, greedy, ignore_eos) through the offline Engine with
dummy weights, profiles ``--steps`` decode steps with torch.profiler (kernels launched from captured
graphs are recorded one by one), and prints each kernel's device time per step next to the wall
time per step: their difference is what the device spends idle between kernels.
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
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine.bench.offline import parse_server_arg
    from engine.entrypoints.engine import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="Decode steps profiled (default: 64).")
    p.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    kw = dict(parse_server_arg(a) for a in args.server_arg)
    engine = Engine(model_path=args.model_path, load_format="dummy", log_level="warning", **kw)
    bs, n = args.batch_size, args.steps
    prompts = [[(i * 7919 + j * 31) % 30000 + 100 for j in range(args.prompt_len)] for i in range(bs)]
    warm = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=warm)

    def run(new_tokens: int) -> float:
        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        engine.flush_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    # decode time per step: the difference of two runs that differ only in their decode steps
    short, long_ = run(2), run(2 + n)
    step_ms = 1e3 * (long_ - short) / n
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(2 + n)
    engine.shutdown()

    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)
        if e.device_type.name != "CUDA" or t <= 0:
            continue
        row = per_kernel[_short(e.name)]
        row[0] += t
        row[1] += 1
    total_steps = n + 2     # the profiled run: a prefill + n + 1 decode steps; prefill kernels are
    rows = sorted(((t / 1e3 / total_steps, c / total_steps, k) for k, (t, c) in per_kernel.items()), reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"batch {bs}, prompt {args.prompt_len}: decode step {step_ms:.3f} ms wall "
          f"({bs / step_ms * 1e3:.1f} tok/s); kernels {busy:.3f} ms per step (prefill included, spread)")
    print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for t, c, k in rows[: args.top]:
        print(f"{t:8.4f} {100 * t / busy:5.1f}% {c:10.1f}  {k}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"batch_size": bs, "prompt_len": args.prompt_len, "steps": n, "step_ms": step_ms,
                       "kernel_ms_per_step": busy, "server_args": kw,
                       "kernels": [{"name": k, "ms_per_step": t, "calls_per_step": c} for t, c, k in rows]},
                      f, indent=1)


if __name__ == "__main__":
    main()
