"""Small-batch decode speed against the memory-bandwidth floor.

    python benchmarks/bench_decode.py --shape llama-3.1-8b --device cuda [--batch-size 1 4 16]
                                      [--output-file out.json]

Builds a checkpoint folder with the real model's config.json (weights are random:
--load-format dummy), runs one request (random prompt, greedy, ignore_eos) through the
offline Engine, and reports decode tokens/s next to the floor: the device-to-device copy
bandwidth measured in the same run over the bytes of weights read per token. With a batch size
B > 1, B such requests (different prompts) are submitted together; decode tokens/s comes from
the engine's step clock (decode steps' wall time), and the floor counts each step's reads of the
weights and of the batch's KV cache (at the mean context length).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": [128001, 128009],
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    },
}


def shape_folder(shape: str) -> str:
    """A folder with the shape's config.json and a (small, locally trained) tokenizer."""
    from engine.models.make_model import cached_model_path

    tok_src = cached_model_path("llama", "tiny")
    out = tempfile.mkdtemp(prefix=f"anyserve-{shape}-")
    for name in os.listdir(tok_src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tok_src, name), out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f, indent=2)
    return out


def copy_bandwidth(platform, device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    platform.synchronize()
    n = 20 if device.type != "cpu" else 3
    t = time.perf_counter()
    for _ in range(n):
        dst.copy_(src)
    platform.synchronize()
    return 2 * nbytes * n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1],
                   help="decode batch sizes, each measured in turn in the same engine")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--extra", default="", help="more Engine kwargs as JSON, e.g. '{\"disable_cuda_graph\": true}'")
    p.add_argument("--output-file", default=None)
    args = p.parse_args()

    from engine import Engine

    folder = shape_folder(args.shape)
    kw = dict(dtype=args.dtype, load_format="dummy", context_length=args.prompt_len + args.output_len + 8,
              log_level="warning", **json.loads(args.extra or "{}"))
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    kw.setdefault("max_running_requests", max(args.batch_size))
    engine = Engine(model_path=folder, device=args.device, **kw)
    rows = []
    try:
        runner = engine.scheduler.runner
        device = runner.device
        weight_bytes = runner.weight_bytes
        bw = copy_bandwidth(runner.platform, device)
        rng = random.Random(0)
        params = {"max_new_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
        for batch in args.batch_size:
            prompts = [[rng.randrange(100, runner.vocab_size) for _ in range(args.prompt_len)] for _ in range(batch)]
            engine.generate(input_ids=prompts, sampling_params={**params, "max_new_tokens": 8})  # warm-up
            engine.flush_cache()
            if batch == 1:
                times = []
                for chunk in engine.generate(input_ids=prompts[0], sampling_params=params, stream=True):
                    times.append((time.perf_counter(), len(chunk["output_ids"])))
                (t_first, n_first), (t_last, n_last) = times[0], times[-1]
                decode_tps = (n_last - n_first) / (t_last - t_first)
            else:
                before = engine.get_stats().step_totals
                engine.generate(input_ids=prompts, sampling_params=params)
                steps = engine.get_stats().step_totals - before
                decode_tps = steps.decode_tokens / steps.decode_seconds
            engine.flush_cache()
            # bytes a step reads: the weights, and the batch's KV at the mean context of the decode
            kv_bytes = batch * (args.prompt_len + args.output_len / 2) * runner.kv_bytes_per_token if batch > 1 else 0
            floor = batch * bw / (weight_bytes + kv_bytes)
            rows.append({"batch_size": batch, "floor_tokens_per_s": floor, "decode_tokens_per_s": decode_tps,
                         "fraction_of_floor": decode_tps / floor, "kv_gb_per_step": kv_bytes / 1e9})
    finally:
        engine.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    result = {"shape": args.shape, "device": str(device), "dtype": args.dtype,
              "attention_backend": runner.attention_backend_name, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "weight_gb": weight_bytes / 1e9, "copy_bandwidth_gb_s": bw / 1e9,
              "device_name": runner.platform.description(), **rows[0], "batches": rows}
    print(f"{'shape':14} {'device':10} {'batch':>5} {'weights GB':>10} {'copy GB/s':>10} {'floor tok/s':>11} "
          f"{'decode tok/s':>12} {'of floor':>8}")
    for row in rows:
        print(f"{args.shape:14} {device.type:10} {row['batch_size']:5d} {result['weight_gb']:10.2f} "
              f"{result['copy_bandwidth_gb_s']:10.0f} {row['floor_tokens_per_s']:11.1f} "
              f"{row['decode_tokens_per_s']:12.1f} {row['fraction_of_floor']:8.1%}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
