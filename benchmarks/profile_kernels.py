"""Where the device time of an offline run goes: the top kernels by total time.

    python benchmarks/profile_kernels.py MODEL_DIR [--num-prompts 300] [--server-arg KEY=VALUE ...]

Runs a sharegpt-synthetic workload through the offline Engine (dummy weights) under torch.profiler
and prints the kernels that took the most device time, with the wall time of the run, so that the
device-busy fraction (sum of kernel time / wall) says whether the run is device- or host-bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine.bench.datasets import sharegpt_synthetic_lengths
    from engine.bench.offline import parse_server_arg
    from engine.entrypoints.engine import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path")
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    kw = dict(parse_server_arg(a) for a in args.server_arg)
    engine = Engine(model_path=args.model_path, load_format="dummy", log_level="warning", **kw)
    ins, outs = sharegpt_synthetic_lengths(args.num_prompts, seed=0)
    prompts = [[(i * 31 + j) % 30000 + 100 for j in range(n)] for i, n in enumerate(ins)]
    params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in outs]
    engine.generate(input_ids=prompts[:4], sampling_params=params[:4])
    engine.flush_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    engine.shutdown()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / 1e6, e.count, e.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"wall {wall:.2f} s, kernels {busy:.2f} s ({100 * busy / wall:.0f}% busy), {sum(outs)} output tokens, "
          f"{sum(outs) / wall:.0f} tok/s")
    for t, n, k in rows[: args.top]:
        print(f"{t:8.3f} s {100 * t / busy:5.1f}% {n:7d}  {k[:110]}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"wall_s": wall, "busy_s": busy, "kernels": rows[:100]}, f, indent=1)


if __name__ == "__main__":
    main()
