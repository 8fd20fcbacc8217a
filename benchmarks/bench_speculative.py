"""N-gram speculative decoding (--speculative-algorithm NGRAM) against plain decoding, same workloads,
one run.

    python benchmarks/bench_speculative.py [--batch-sizes 1,8] [--output-len 128] [--output-file out.json]
    python benchmarks/bench_speculative.py --shape llama-3.1-8b --device cuda

Workloads (greedy unless named "sampled", every request stopping at exactly --output-len tokens):
"repetitive": the prompt is one passage of random tokens repeated 4 times, the kind of text a
model asked to copy or continue a passage produces (drafts are found in the prompt and in the
output); "repetitive-sampled": the same at temperature 0.7 with a seed per request; "non-repetitive":
a prompt of distinct tokens. Each workload runs on an Engine with speculative decoding off and one
with it on; both must give the same tokens (checked). Decode time is the time of the full run minus
that of a one-token run (the prefill), with the prefix cache flushed before each; forward steps are
the scheduler's (prefill and decode); accept length is tokens emitted per request and decode step.
In float32 the tokens must be the same (the script fails otherwise); in bfloat16 a verify step's
logits are rounded differently from a decode step's (other kernel shapes), so a near-tie may flip a
token, as a different batch can: "same" reports it.

With random weights (the default 'small' checkpoint, or --shape) the model does not copy its prompt:
drafts are accepted where its output falls into loops, so the acceptance here says little about a
trained model's; the cost side (verify steps against decode steps) is what this measures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.engine_bench import add_engine_args, engine_kwargs, model_folder, timed_run  # noqa: E402

WORKLOADS = ("repetitive", "repetitive-sampled", "non-repetitive")


def make_prompts(workload: str, batch: int, prompt_len: int, vocab: int, rng: random.Random) -> list[list[int]]:
    if workload == "non-repetitive":
        return [rng.sample(range(10, vocab), prompt_len) for _ in range(batch)]
    prompts = []
    for _ in range(batch):
        passage = [rng.randrange(10, vocab) for _ in range(max(1, prompt_len // 4))]
        prompts.append((passage * 4)[:prompt_len])
    return prompts


def make_params(workload: str, batch: int, output_len: int) -> list[dict]:
    base = {"max_new_tokens": output_len, "ignore_eos": True}
    if workload == "repetitive-sampled":
        return [{**base, "temperature": 0.7, "seed": i} for i in range(batch)]
    return [{**base, "temperature": 0.0}] * batch


def measure(engine: Any, prompts: list[list[int]], params: list[dict], output_len: int) -> dict:
    sched = engine.scheduler
    prefill_s, _ = timed_run(engine, prompts, [{**p, "max_new_tokens": 1} for p in params])
    steps_before = sched.forward_ct
    spec_before = sched.spec.totals if sched.spec is not None else None
    total_s, outs = timed_run(engine, prompts, params)
    lengths = {o["meta_info"]["completion_tokens"] for o in outs}
    assert lengths == {output_len}, lengths
    decode_s = max(total_s - prefill_s, 1e-9)
    row = {"decode_s": decode_s, "decode_tokens_per_s": len(prompts) * (output_len - 1) / decode_s,
           "output_tokens_per_s": len(prompts) * output_len / total_s,
           "forward_steps": sched.forward_ct - steps_before, "accept_length": 1.0,
           "output_ids": [o["output_ids"] for o in outs]}
    if spec_before is not None:
        spec = sched.spec.totals
        req_steps = spec.req_steps - spec_before.req_steps
        accepted = spec.accepted_tokens - spec_before.accepted_tokens
        drafts = spec.draft_tokens - spec_before.draft_tokens
        row.update(accept_length=(req_steps + accepted) / max(1, req_steps), draft_tokens=drafts,
                   accepted_tokens=accepted, verify_steps=spec.verify_steps - spec_before.verify_steps)
    return row


def run_engine(folder: str, args: argparse.Namespace, kw: dict, spec: bool,
               cases: list[tuple[str, int, list[list[int]]]]) -> dict[tuple[str, int], dict]:
    """Every case on one Engine: the fastest of --repeats runs each."""
    from engine import Engine

    extra = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=args.num_draft_tokens) if spec else {}
    engine = Engine(model_path=folder, device=args.device, **kw, **extra)
    best: dict[tuple[str, int], dict] = {}
    try:
        engine.generate(input_ids=[[5, 6, 7]], sampling_params={"max_new_tokens": 4})     # warm up
        for _ in range(args.repeats):
            for workload, batch, prompts in cases:
                run = measure(engine, prompts, make_params(workload, batch, args.output_len), args.output_len)
                key = (workload, batch)
                if key not in best or run["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
                    best[key] = run
        best[("", 0)] = {"device": engine.scheduler.runner.platform.description(),
                         "vocab": engine.scheduler.runner.vocab_size}
    finally:
        engine.shutdown()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, batch_sizes="1,8", prompt_len=256, output_len=128)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    args = p.parse_args()

    folder, temporary = model_folder(args)
    kw, batch_sizes = engine_kwargs(args, temporary)
    try:
        from engine.models.config import ModelConfig
        from engine.tokenizer import load_tokenizer

        vocab = min(ModelConfig.from_pretrained(folder).vocab_size, len(load_tokenizer(folder)))
        rng = random.Random(0)
        cases = [(w, b, make_prompts(w, b, args.prompt_len, vocab, rng)) for w in WORKLOADS for b in batch_sizes]
        off = run_engine(folder, args, kw, False, cases)
        on = run_engine(folder, args, kw, True, cases)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)

    results = []
    for workload, batch, _ in cases:
        a, b = off[(workload, batch)], on[(workload, batch)]
        ids_off, ids_on = a.pop("output_ids"), b.pop("output_ids")
        same = ids_off == ids_on
        # per request: the first output position where the tokens differ (None: identical)
        first_diff = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), None) for u, v in zip(ids_off, ids_on)]
        results.append({"workload": workload, "batch_size": batch, "off": a, "on": b, "same_tokens": same,
                        "first_difference": first_diff,
                        "speedup": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
                        "step_ratio": b["forward_steps"] / max(1, a["forward_steps"])})
    info = {"model": args.shape or os.path.basename(folder.rstrip("/")), "device": off[("", 0)]["device"],
            "dtype": args.dtype, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "num_draft_tokens": args.num_draft_tokens, "results": results}

    print(f"{info['model']} on {info['device']}, {args.dtype}, prompt {args.prompt_len} tokens, output "
          f"{args.output_len} tokens, {args.num_draft_tokens} draft tokens")
    print(f"{'workload':>18} {'batch':>5} {'off tok/s':>9} {'on tok/s':>9} {'speedup':>7} {'off steps':>9} "
          f"{'on steps':>8} {'accept len':>10} {'same':>5}")
    for r in results:
        print(f"{r['workload']:>18} {r['batch_size']:5d} {r['off']['decode_tokens_per_s']:9.1f} "
              f"{r['on']['decode_tokens_per_s']:9.1f} {r['speedup']:7.3f} {r['off']['forward_steps']:9d} "
              f"{r['on']['forward_steps']:8d} {r['on']['accept_length']:10.2f} {'yes' if r['same_tokens'] else 'NO':>5}")
    print("tok/s: decode tokens per second; speedup: on over off; steps: forward steps of the run (prefill "
          "included); accept len: tokens emitted per request and decode step; same: identical tokens on and off")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(info, f, indent=2)
    if args.dtype == "float32" and not all(r["same_tokens"] for r in results):
        sys.exit("speculative decoding changed the tokens in float32")


if __name__ == "__main__":
    main()
