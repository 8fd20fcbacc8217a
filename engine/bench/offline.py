"""``anyserve bench offline``: one workload through the offline Engine (every prompt submitted at
once) and through transformers' ``generate`` in static batches, in one run; prints tokens/s and
the ratio, writes JSON.

``--compare FLAG`` runs anyserve twice, with a boolean server flag at its default and toggled (a
fresh Engine each), and reports the ratio (``--compare KEY=VALUE``: any flag at its default, then
at VALUE); ``--server-arg KEY=VALUE`` passes any other ServerArgs
field. With ``--load-format dummy`` the model folder may hold only config.json and a tokenizer
(benchmarks/make_shape_folder.py): anyserve makes random weights, transformers builds the model
from the config with random initialisation on the device.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Optional

import numpy as np

from engine.bench.datasets import describe_lengths, length_stats, sharegpt_synthetic_lengths

logger = logging.getLogger(__name__)

GiB = 1 << 30

# The highest published offline figure for this model on one H100 that we know of; printed next to
# ours for --dataset sharegpt-synthetic. Their workload: Llama-3.1-8B-Instruct, bf16, one H100
# 80GB, 0.8 GPU memory utilisation, 1,000 ShareGPT prompts, output tokens/s of offline batch
# inference, mean of 10 runs. Their prompts are real ShareGPT text; ours have the same length
# statistics (datasets.SHAREGPT_FIT) and random tokens.
PUBLISHED_SHAREGPT_H100 = {
    "source": "AIMultiple Research, 'LLM inference engines' benchmark (vLLM vs LMDeploy vs SGLang on H100), "
              "https://research.aimultiple.com/inference-engines",
    "workload": "Llama-3.1-8B-Instruct, bf16, 1x H100 80GB, 1,000 ShareGPT prompts, offline batch",
    "output_tokens_per_s": {"sglang": 16215.0, "lmdeploy": 16132.0, "vllm": 12553.0},
}


def add_bench_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None,
                   help="Checkpoint folder (default: the 'small' qwen2 model, made on first use in the cache). "
                        "With --load-format dummy, config.json and tokenizer files are enough.")
    p.add_argument("--device", default="auto", help="Device for both engines (default: auto).")
    p.add_argument("--dtype", default="bfloat16", help="dtype for both engines (default: bfloat16).")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="Passed to anyserve; with dummy, transformers too builds random weights from "
                        "config.json (default: auto).")

    data = p.add_argument_group("workload")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", choices=["random", "sharegpt-synthetic"],
                      default="random", help="random: the lengths below; sharegpt-synthetic: ShareGPT's "
                      "published length statistics (engine.bench.datasets.SHAREGPT_FIT). Default: random")
    data.add_argument("--num-prompts", type=int, default=64, help="Requests in the workload (default: 64).")
    data.add_argument("--random-input-len", type=int, default=None,
                      help="Prompt length; with --random-range-ratio r, uniform in [len * r, len]. "
                           "Replaces --min/--max-input-len.")
    data.add_argument("--random-output-len", type=int, default=None,
                      help="Output length, drawn like --random-input-len. Replaces --output-len.")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="1.0 makes the --random-*-len lengths fixed (default: 0.0, as bench serving).")
    data.add_argument("--min-input-len", type=int, default=64, help="Shortest prompt, tokens (default: 64).")
    data.add_argument("--max-input-len", type=int, default=512, help="Longest prompt, tokens (default: 512).")
    data.add_argument("--output-len", type=int, default=128, help="Tokens generated per request (default: 128).")
    data.add_argument("--sharegpt-context-len", type=int, default=2048,
                      help="sharegpt-synthetic keeps prompt + output <= this (default: 2048).")
    data.add_argument("--seed", type=int, default=0, help="Seed of the prompt lengths and tokens (default: 0).")

    srv = p.add_argument_group("anyserve")
    srv.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="Any ServerArgs field for the Engine, e.g. mem_fraction_static=0.85, "
                          "cuda_graph_max_bs=256, attention_backend=triton (repeatable).")
    srv.add_argument("--compare", default=None, metavar="FLAG",
                     help="A boolean ServerArgs field (e.g. disable_overlap_schedule, disable_cuda_graph): "
                          "run anyserve with it at its default and toggled, and report the ratio; or "
                          "KEY=VALUE (e.g. kv_cache_dtype=fp8_e4m3): the field at its default, then at VALUE.")
    srv.add_argument("--max-running-requests", type=int, default=None, help="Passed to anyserve.")
    srv.add_argument("--chunked-prefill-size", type=int, default=None, help="Passed to anyserve.")
    srv.add_argument("--isolate", action="store_true",
                     help="Run each engine (and the baseline) in a fresh process, so that nothing one "
                          "leaves in device memory shrinks the next one's KV cache.")

    hf = p.add_argument_group("transformers baseline")
    hf.add_argument("--hf-batch-size", type=int, default=16,
                    help="Static batch size of the transformers baseline (default: 16).")
    hf.add_argument("--hf-num-prompts", type=int, default=None,
                    help="Run the baseline on only the first N prompts (when it is too slow); "
                         "tokens/s stays comparable.")
    hf.add_argument("--skip-hf", action="store_true", help="Run only anyserve.")
    p.add_argument("--output-file", default=None, help="Write the results as JSON here.")


# ---- server arguments: --server-arg and --compare ------------------------------------------------
def _server_fields() -> dict[str, dataclasses.Field]:
    from engine.server_args import ServerArgs

    return {f.name: f for f in dataclasses.fields(ServerArgs)}


def _field_name(name: str, what: str) -> str:
    key = name.strip().lstrip("-").replace("-", "_")
    if key not in _server_fields():
        raise ValueError(f"{what}: {name!r} is not a server argument (a field of engine.server_args.ServerArgs, "
                         f"e.g. mem_fraction_static)")
    return key


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in ("bool", bool)


def parse_server_arg(item: str) -> tuple[str, Any]:
    """'mem_fraction_static=0.85' -> ('mem_fraction_static', 0.85), typed by the ServerArgs field;
    'none' gives None for optional fields."""
    if "=" not in item:
        raise ValueError(f"--server-arg must be KEY=VALUE, got {item!r}")
    raw_key, text = item.split("=", 1)
    key = _field_name(raw_key, "--server-arg")
    f = _server_fields()[key]
    t = str(f.type)
    if text.strip().lower() == "none" and "Optional" in t:
        return key, None
    try:
        if _is_bool(f):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return key, low in ("true", "1", "yes")
        if "int" in t:
            return key, int(text)
        if "float" in t:
            return key, float(text)
    except ValueError:
        raise ValueError(f"--server-arg {key}: cannot read {text!r} as {t}") from None
    return key, text


def server_arg_overrides(items: list[str]) -> dict[str, Any]:
    """--server-arg items as a dict; the fields the bench sets itself are refused."""
    out = dict(parse_server_arg(i) for i in items)
    for key in ("model_path", "device"):
        if key in out:
            raise ValueError(f"--server-arg {key}: use --{key.replace('_', '-')} instead")
    return out


def compare_field(name: str) -> tuple[str, Any, Any]:
    """The ServerArgs field --compare sets, its default and its other value: a boolean toggled, or
    KEY=VALUE's value."""
    if "=" in name:
        key, value = parse_server_arg(name)
        default = _server_fields()[key].default
        if value == default:
            raise ValueError(f"--compare {name}: {value!r} is the default; compare with another value")
        return key, default, value
    key = _field_name(name, "--compare")
    f = _server_fields()[key]
    if not _is_bool(f):
        raise ValueError(f"--compare {key}: only boolean server arguments can be toggled (its type is {f.type}); "
                         f"give another field as KEY=VALUE")
    return key, bool(f.default), not f.default


def compare_variants(compare: Optional[str], overrides: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(label, overrides)]: one run, or with --compare the default first and the other value second."""
    if not compare:
        return [("anyserve", overrides)]
    key, default, other = compare_field(compare)
    if key in overrides:
        raise ValueError(f"--compare {key} and --server-arg {key}=... contradict each other")
    return [(f"{key}={v}", {**overrides, key: v}) for v in (default, other)]


def server_cli_flags(overrides: dict[str, Any]) -> list[str]:
    """The `anyserve serve` flags that set the given ServerArgs fields (bools as switches)."""
    fields = _server_fields()
    flags: list[str] = []
    for key, value in overrides.items():
        f = fields[_field_name(key, "server argument")]
        flag = "--" + f.name.replace("_", "-")
        if _is_bool(f):
            if bool(value) != bool(f.default):
                flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is None:
            if f.default is not None:
                raise ValueError(f"{f.name}=None cannot be given on the command line (its default is {f.default})")
        else:
            flags += [flag, str(value)]
    return flags


# ---- workload -------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[list[int]]      # token ids, drawn from [10, vocab_size)
    output_lens: list[int]        # exact output lengths (ignore_eos)
    description: str

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def _uniform(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    return rng.integers(lo, hi + 1, size=n).tolist()


def workload_lengths(args: argparse.Namespace) -> tuple[list[int], list[int], str]:
    """(input_lens, output_lens, a one-line description) from the workload flags."""
    n = args.num_prompts
    if n < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {n}")
    if args.dataset == "sharegpt-synthetic":
        ins, outs = sharegpt_synthetic_lengths(n, args.seed, args.sharegpt_context_len)
        return ins, outs, f"{n} requests, sharegpt-synthetic lengths"
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {args.random_range_ratio}")
    rng = np.random.default_rng(args.seed)
    if args.random_input_len is not None:
        hi = args.random_input_len
        lo = max(1, int(hi * args.random_range_ratio))
    else:
        lo, hi = args.min_input_len, args.max_input_len
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt lengths must satisfy 1 <= min <= max, got [{lo}, {hi}] "
                         "(--min-input-len/--max-input-len or --random-input-len)")
    ins = _uniform(rng, n, lo, hi)
    if args.random_output_len is not None:
        out_hi = args.random_output_len
        out_lo = max(1, int(out_hi * args.random_range_ratio))
    else:
        out_lo = out_hi = args.output_len
    if not 1 <= out_lo <= out_hi:
        raise ValueError(f"output length must be >= 1, got {out_hi} (--output-len or --random-output-len)")
    outs = _uniform(rng, n, out_lo, out_hi)
    return ins, outs, f"{n} requests, prompts {_span(lo, hi)} tokens, outputs {_span(out_lo, out_hi)} tokens"


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def build_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    ins, outs, description = workload_lengths(args)
    rng = np.random.default_rng(args.seed + 1)
    # Leave the first ids (special tokens in most tokenizers) out.
    prompts = [rng.integers(10, vocab_size, size=k).tolist() for k in ins]
    return Workload(prompts, outs, description)


# ---- anyserve -------------------------------------------------------------------------------
def run_anyserve(model_path: str, workload: Workload, args: argparse.Namespace,
                 overrides: dict[str, Any]) -> dict[str, Any]:
    """One fresh Engine: warm up, submit every prompt at once, time submit -> last token, shut down
    and give the device memory back."""
    import hal
    from engine.entrypoints.engine import Engine

    kw: dict[str, Any] = {"dtype": args.dtype, "load_format": args.load_format, "log_level": "warning"}
    if args.max_running_requests:
        kw["max_running_requests"] = args.max_running_requests
    if args.chunked_prefill_size:
        kw["chunked_prefill_size"] = args.chunked_prefill_size
    kw.update(overrides)
    platform = hal.get_platform(args.device)
    free_before = platform.memory_info()[0]
    t0 = time.perf_counter()
    engine = Engine(model_path=model_path, device=args.device, **kw)
    startup = time.perf_counter() - t0
    try:
        info = _engine_info(engine)
        params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in workload.output_lens]
        warm = min(4, len(workload.prompts))
        engine.generate(input_ids=workload.prompts[:warm],
                        sampling_params=[{**p, "max_new_tokens": min(4, p["max_new_tokens"])} for p in params[:warm]])
        engine.flush_cache()  # the warm-up prompts are the workload's first ones
        before = engine.get_stats().step_totals
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=workload.prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
        stats = engine.get_stats()
        steps = stats.step_totals - before
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        platform.empty_cache()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(workload.input_lens)
    result = {"seconds": elapsed, "startup_seconds": startup, "requests": len(workload.prompts),
              "input_tokens": in_tokens, "output_tokens": out_tokens,
              "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
              "requests_per_s": len(workload.prompts) / elapsed,
              "retractions": stats.num_retractions, "steps": dataclasses.asdict(steps),
              "steps_summary": steps.describe(), "server_args": overrides, **info}
    if not platform.uses_host_memory:
        free_after = platform.memory_info()[0]
        result["device_free_gib_before"] = free_before / GiB
        result["device_free_gib_after"] = free_after / GiB
        if free_after < free_before - GiB:
            logger.warning("device memory not given back after shutdown: %.1f GiB free before the engine, %.1f "
                           "after; the next run's KV cache shrinks (use --isolate)", free_before / GiB,
                           free_after / GiB)
    return result


def _engine_info(engine: Any) -> dict[str, Any]:
    """What the engine chose (for the JSON): backends, graphs, KV capacity, device."""
    # (no in-process scheduler with dp_size > 1: then only the run's figures are recorded)
    runner = getattr(getattr(engine, "scheduler", None), "runner", None)
    info = {"attention_backend": getattr(runner, "attention_backend_name", None),
            "graphs": getattr(runner, "graphs_reason", None),
            "max_total_tokens": getattr(runner, "max_total_tokens", None),
            "kv_cache_dtype": str(getattr(runner, "kv_cache_dtype", "")).replace("torch.", "") or None,
            "max_running_requests": getattr(runner, "max_running_requests", None)}
    platform = getattr(runner, "platform", None)
    if platform is not None:
        info["device_name"] = platform.description()
    return info


# ---- transformers ---------------------------------------------------------------------------
def run_transformers(model_path: str, workload: Workload, batch_size: int, device: str, dtype: str,
                     random_weights: bool) -> dict[str, Any]:
    """Static batches of transformers' generate, left-padded, greedy, exactly max(output_lens of the
    batch) new tokens per batch. Output tokens counted are the requested ones (a batch pads shorter
    requests' outputs to its longest: that waste is static batching's cost)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hal.platform import platform_for_device

    if batch_size < 1:
        raise ValueError(f"--hf-batch-size must be >= 1, got {batch_size}")
    torch_dtype = getattr(torch, dtype)
    platform = platform_for_device(torch.device(device))
    t0 = time.perf_counter()
    if random_weights:
        # Built on the device directly: an 8B model initialised on the host takes minutes.
        config = AutoConfig.from_pretrained(model_path)
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            except TypeError:      # transformers before 4.56 calls it torch_dtype
                model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device)
    model.eval()
    startup = time.perf_counter() - t0
    pad = 0
    generated = 0
    prompts, output_lens = workload.prompts, workload.output_lens
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, new = prompts[i: i + batch_size], max(output_lens[i: i + batch_size])
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=pad)
        generated += (out.shape[1] - width) * len(batch)
    platform.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    platform.empty_cache()
    out_tokens, in_tokens = sum(output_lens), sum(workload.input_lens)
    return {"seconds": elapsed, "startup_seconds": startup, "requests": len(prompts), "batch_size": batch_size,
            "input_tokens": in_tokens, "output_tokens": out_tokens, "generated_tokens": generated,
            "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
            "requests_per_s": len(prompts) / elapsed, "random_weights": random_weights}


# ---- the run --------------------------------------------------------------------------------
def _call(isolate: bool, fn: Callable[..., dict], *fn_args: Any) -> dict:
    """fn(*fn_args) here, or in a fresh spawned process that takes its device memory with it."""
    if not isolate:
        return fn(*fn_args)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def run_bench_offline(args: argparse.Namespace) -> dict[str, Any]:
    from engine.entrypoints.logging_setup import setup_logging
    from engine.models.config import read_vocab_size

    setup_logging("warning")
    variants = compare_variants(args.compare, server_arg_overrides(args.server_arg))
    model_path = args.model_path or _default_small_model(args.dtype)
    workload = build_workload(args, read_vocab_size(model_path))
    device = _resolve_device(args.device)
    result: dict[str, Any] = {
        "model_path": model_path, "device": device, "dtype": args.dtype, "load_format": args.load_format,
        "dataset": args.dataset, "num_prompts": args.num_prompts, "seed": args.seed,
        "workload": workload.description, "input_len": length_stats(workload.input_lens),
        "output_len": length_stats(workload.output_lens), "environment": environment_info(),
    }
    print(f"workload: {workload.description}, ignore_eos, greedy; {device} {args.dtype}, "
          f"load format {args.load_format}", flush=True)
    print(describe_lengths(workload.input_lens, workload.output_lens), flush=True)
    runs = []
    for label, overrides in variants:
        print(f"--- {label if label.startswith('anyserve') else 'anyserve: ' + label} ---", flush=True)
        run = _call(args.isolate, run_anyserve, model_path, workload, args, overrides)
        runs.append({"label": label, **run})
        print(f"{label}: {run['output_tokens_per_s']:.1f} output tok/s in {run['seconds']:.1f} s", flush=True)
        print(f"  where the time went: {run['steps_summary']}", flush=True)
    result["anyserve"] = runs[0]
    if args.compare:
        result["compare"] = {"flag": variants[0][0].split("=")[0], "runs": runs,
                             "ratio": runs[0]["output_tokens_per_s"] / runs[1]["output_tokens_per_s"]}
    if not args.skip_hf:
        n = args.hf_num_prompts or len(workload.prompts)
        sub = Workload(workload.prompts[:n], workload.output_lens[:n], f"first {n} prompts")
        print(f"--- transformers: {n} prompts, static batches of {args.hf_batch_size} ---", flush=True)
        random_weights = args.load_format == "dummy" or not _has_weights(model_path)
        result["transformers"] = _call(args.isolate, run_transformers, model_path, sub, args.hf_batch_size,
                                       device, args.dtype, random_weights)
        result["ratio"] = result["anyserve"]["output_tokens_per_s"] / result["transformers"]["output_tokens_per_s"]
    if args.dataset == "sharegpt-synthetic":
        ref = PUBLISHED_SHAREGPT_H100
        sglang = ref["output_tokens_per_s"]["sglang"]
        result["published"] = {**ref, "anyserve_over_sglang": result["anyserve"]["output_tokens_per_s"] / sglang,
                               "anyserve_total_over_sglang": result["anyserve"]["total_tokens_per_s"] / sglang}
    print(format_offline_table(result))
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _has_weights(model_path: str) -> bool:
    return any(n.endswith((".safetensors", ".bin")) for n in os.listdir(model_path))


def _resolve_device(device: str) -> str:
    import hal

    return hal.get_platform(device).device(0).type


def _default_small_model(dtype: str) -> str:
    from engine.models.make_model import cached_model_path

    return str(cached_model_path("qwen2", "small", dtype=dtype))


def environment_info() -> dict[str, Any]:
    """Versions and the commit, so a recorded result says what it measured."""
    import torch
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
        env["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                           capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def format_offline_table(r: dict[str, Any]) -> str:
    """The compact table: one row per engine run, then the ratios."""
    runs = r["compare"]["runs"] if "compare" in r else [r["anyserve"]]
    rows = [("engine", "requests", "output tokens", "seconds", "output tok/s", "total tok/s", "req/s")]
    named = [(f"anyserve {x['label']}" if "compare" in r else "anyserve", x) for x in runs]
    if "transformers" in r:
        named.append((f"transformers (batch {r['transformers']['batch_size']})", r["transformers"]))
    for name, x in named:
        rows.append((name, str(x["requests"]), str(x["output_tokens"]), f"{x['seconds']:.1f}",
                     f"{x['output_tokens_per_s']:.1f}", f"{x['total_tokens_per_s']:.1f}",
                     f"{x['requests_per_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if "compare" in r:
        a, b = runs[0]["label"], runs[1]["label"]
        lines.append(f"ratio {a} / {b}: {r['compare']['ratio']:.2f}x (output tok/s)")
    if "ratio" in r:
        lines.append(f"anyserve / transformers: {r['ratio']:.2f}x (output tok/s)")
    if "published" in r:
        p = r["published"]
        tps = p["output_tokens_per_s"]
        lines.append(f"published, {p['workload']}: SGLang {tps['sglang']:,.0f}, LMDeploy {tps['lmdeploy']:,.0f}, "
                     f"vLLM {tps['vllm']:,.0f} output tok/s")
        lines.append(f"  source: {p['source']}")
        lines.append(f"anyserve / published SGLang: {p['anyserve_over_sglang']:.2f}x (comparable only for the "
                     "Llama-3.1-8B shape on one H100)")
        lines.append(f"  {p['anyserve_total_over_sglang']:.2f}x in input + output tok/s, should the published figure "
                     "count both (SGLang's bench_offline_throughput prints that sum as its 'Throughput')")
    return "\n".join(lines)
