"""FlashInfer on the GPU machine: does it import and JIT-compile there, is it right, is it fast.

At Llama-3.1-8B's attention shapes (32 q heads, 8 KV heads, head dim 128, bf16) and batch 1/16/64,
context 1k/4k: one decode step (one new token per request) and one extend step (512 new tokens
after context - 512 cached ones) through the FlashInfer and Triton attention backends, each
checked against the torch reference backend (fp32 math); then the FlashInfer sampler against the
torch sampler. Prints a table, writes JSON.

    source .flashinfer-carry/setup.sh        # made by benchmarks/pack_flashinfer.sh
    python3 benchmarks/check_flashinfer.py [--prefill-backends fa2 fa3] [--export-aot $OUT/aot]

Timings (triton.testing.do_bench medians): ``meta`` is init_forward_metadata, once per step
(FlashInfer plans on the host there); ``layer`` is forward of one layer (KV store + attention);
``step32`` = meta + 32 layers, what one Llama-3.1-8B step spends in attention. The first FlashInfer
call of each kind JIT-compiles its kernels (nvcc, minutes): ``flashinfer_first_call_s`` ("build s").
--export-aot copies the built modules to a folder that pack_flashinfer.sh --aot puts in the next
carry, so a fresh machine skips the build. On a fresh machine, build first with a small run (the
device tool stops a command at 10 minutes):

    python3 benchmarks/check_flashinfer.py --page-sizes 16 --batch-sizes 1 --contexts 1024 --export-aot $OUT/aot
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_kernels import D, HKV, HQ, NEW_TOKENS, _commit, _fmt, make_case  # noqa: E402

logger = logging.getLogger("check_flashinfer")
LAYERS = 32          # Llama-3.1-8B


def environment() -> dict:
    import flashinfer
    from flashinfer.jit import env as jit_env

    nvcc = shutil.which("nvcc")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] \
        if nvcc else None
    return dict(flashinfer=flashinfer.__version__, flashinfer_path=str(Path(flashinfer.__file__).parent),
                jit_dir=str(jit_env.FLASHINFER_JIT_DIR), nvcc=nvcc, nvcc_version=version,
                cuda_home=os.environ.get("CUDA_HOME"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, python=host.python_version(), commit=_commit())


def build(name: str, pool, req_to_token, page_size: int, **kw):
    from hal.registry import entries

    return entries("attention")[name].factory(
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_pool=pool, req_to_token=req_to_token,
        page_size=page_size, dtype=torch.bfloat16, device=torch.device("cuda"), **kw)


def measure(backend, batch, qkv) -> dict:
    """First-call seconds (JIT build for FlashInfer), meta/layer/step32 ms, and the output."""
    from triton.testing import do_bench

    q, k, v = qkv
    t0 = time.perf_counter()
    backend.init_forward_metadata(batch)
    out = backend.forward(q, k, v, 0, D ** -0.5, batch)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    meta = do_bench(lambda: backend.init_forward_metadata(batch), warmup=5, rep=30, return_mode="median")
    backend.init_forward_metadata(batch)
    layer = do_bench(lambda: backend.forward(q, k, v, 0, D ** -0.5, batch), warmup=5, rep=30, return_mode="median")
    return dict(first_s=first_s, meta_ms=meta, layer_ms=layer, step32_ms=meta + LAYERS * layer, out=out)


def attempt(label: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report the failing case, keep checking the others
        logger.error("%s failed: %s: %s", label, type(e).__name__, str(e)[:2000])
        torch.cuda.empty_cache()
        return None


def check_case(mode: str, bs: int, ctx: int, page_size: int, prefill_backends: list[str]) -> list[dict]:
    pool, r2t, batch, qkv = make_case(mode, bs, ctx, page_size, torch.bfloat16, torch.device("cuda"))
    label = f"{mode} bs={bs} ctx={ctx}"
    ref = attempt(f"torch {label}", lambda: measure(build("torch", pool, r2t, page_size), batch, qkv))
    triton = attempt(f"triton {label}", lambda: measure(build("triton", pool, r2t, page_size), batch, qkv))
    rows = []
    for pb in prefill_backends if mode == "extend" else prefill_backends[:1]:
        fi = attempt(f"flashinfer[{pb}] {label}",
                     lambda: measure(build("flashinfer", pool, r2t, page_size, prefill_backend=pb), batch, qkv))
        row = dict(mode=mode, batch=bs, context=ctx, page_size=page_size,
                   flashinfer_kernels="fa2 (CUDA-core decode)" if mode == "decode" else pb)
        for name, m in (("flashinfer", fi), ("triton", triton)):
            if m is None:
                row[f"{name}_ok"] = False
                continue
            row.update({f"{name}_{key}": m[key] for key in ("meta_ms", "layer_ms", "step32_ms")})
            row[f"{name}_ok"] = True
            if ref is not None:
                row[f"{name}_max_err"] = (m["out"].float() - ref["out"].float()).abs().max().item()
        if fi is not None:
            row["flashinfer_first_call_s"] = fi["first_s"]
        if fi is not None and triton is not None:
            row["layer_speedup_vs_triton"] = triton["layer_ms"] / fi["layer_ms"]
            row["step32_speedup_vs_triton"] = triton["step32_ms"] / fi["step32_ms"]
        logger.info("%s [%s]: flashinfer %s ms/layer (err %s), triton %s ms/layer (err %s)", label,
                    row["flashinfer_kernels"], _fmt(row.get("flashinfer_layer_ms")),
                    _fmt(row.get("flashinfer_max_err"), ".1e"), _fmt(row.get("triton_layer_ms")),
                    _fmt(row.get("triton_max_err"), ".1e"))
        rows.append(row)
    return rows


def check_sampling(batch_sizes: list[int], vocab: int = 128256) -> list[dict]:
    """Greedy rows identical to the torch sampler; timing of a top-k/top-p draw per batch size."""
    from triton.testing import do_bench

    from backends.cpu.torch_sampler import TorchSampler
    from backends.cuda.flashinfer_sampling import FlashInferSampler
    from engine.sampling.sampling_batch_info import SamplingBatchInfo
    from engine.sampling.sampling_params import SamplingParams

    device = torch.device("cuda")
    ours, ref = FlashInferSampler(vocab, device), TorchSampler(vocab, device)
    rows = []
    for bs in batch_sizes:
        params = [SamplingParams.from_dict({"temperature": 0.0 if i % 4 == 0 else 0.8, "top_p": 0.9, "top_k": 50})
                  for i in range(bs)]
        info = SamplingBatchInfo.build(
            params, seeds=list(range(bs)), steps=[3] * bs, output_ids=[[]] * bs, prompt_ids=[[]] * bs,
            banned_token_ids=[[]] * bs, top_logprobs_nums=[0] * bs, return_logprob=[False] * bs,
            vocab_size=vocab, device=device)
        logits = torch.randn(bs, vocab, device=device) * 4
        greedy = info.greedy_rows
        same = torch.equal(ours.sample(logits.clone(), info).next_token_ids[greedy], logits[greedy].argmax(-1))
        t_fi = do_bench(lambda: ours.sample(logits.clone(), info), warmup=5, rep=30, return_mode="median")
        t_torch = do_bench(lambda: ref.sample(logits.clone(), info), warmup=5, rep=30, return_mode="median")
        rows.append(dict(batch=bs, vocab=vocab, greedy_identical=same, flashinfer_ms=t_fi, torch_ms=t_torch))
        logger.info("sampling bs=%d: flashinfer %.3f ms, torch %.3f ms, greedy identical %s", bs, t_fi, t_torch, same)
    return rows


def export_aot(dest: Path) -> list[str]:
    """Copy every JIT-built module (NAME/NAME.so) for pack_flashinfer.sh --aot."""
    from flashinfer.jit import env as jit_env

    names = []
    for so in sorted(Path(jit_env.FLASHINFER_JIT_DIR).glob("*/*.so")):
        if so.stem == so.parent.name:
            (dest / so.stem).mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, dest / so.stem / so.name)
            names.append(f"{so.stem} ({so.stat().st_size / 2**20:.1f} MiB)")
    return names


def print_table(report: dict) -> None:
    env = report["environment"]
    print(f"\n{env['device']}, flashinfer {env['flashinfer']}, {env['nvcc_version']}, torch {env['torch']}, "
          f"commit {env['commit']}; Llama-3.1-8B attention ({HQ}/{HKV} heads, head dim {D}, bf16)")
    print(f"{'mode':<7}{'page':>5}{'batch':>6}{'ctx':>6}  {'kernels':<24}{'fi meta':>8}{'fi layer':>9}{'tr layer':>9}"
          f"{'fi step32':>10}{'tr step32':>10}{'x layer':>8}{'fi err':>9}{'tr err':>9}{'build s':>8}")
    for r in report["attention"]:
        print(f"{r['mode']:<7}{r['page_size']:>5}{r['batch']:>6}{r['context']:>6}  {r['flashinfer_kernels']:<24}"
              f"{_fmt(r.get('flashinfer_meta_ms')):>8}{_fmt(r.get('flashinfer_layer_ms')):>9}"
              f"{_fmt(r.get('triton_layer_ms')):>9}{_fmt(r.get('flashinfer_step32_ms')):>10}"
              f"{_fmt(r.get('triton_step32_ms')):>10}{_fmt(r.get('layer_speedup_vs_triton'), '.2f'):>8}"
              f"{_fmt(r.get('flashinfer_max_err'), '.1e'):>9}{_fmt(r.get('triton_max_err'), '.1e'):>9}"
              f"{_fmt(r.get('flashinfer_first_call_s'), '.1f'):>8}")
    for r in report["sampling"]:
        print(f"sampling bs={r['batch']}: flashinfer {r['flashinfer_ms']:.3f} ms, torch {r['torch_ms']:.3f} ms, "
              f"greedy identical: {r['greedy_identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/h100_flashinfer.json", help="JSON results file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--prefill-backends", nargs="+", default=["fa2"], choices=["fa2", "fa3", "auto"],
                        help="FlashInfer extend kernels to check (fa3: Hopper only, longer to build)")
    parser.add_argument("--export-aot", type=Path, help="copy the JIT-built modules here (for --aot)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        sys.exit("check_flashinfer: no CUDA GPU visible to torch; run it on the GPU machine")
    started = time.perf_counter()
    t0 = time.perf_counter()
    env = environment()       # imports flashinfer: fails here, with its traceback, if it cannot
    env["import_s"] = round(time.perf_counter() - t0, 1)
    logger.info("environment: %s", env)
    rows = []
    for page_size in args.page_sizes:
        for mode in ("decode", "extend"):
            for bs in args.batch_sizes:
                for ctx in args.contexts:
                    rows += check_case(mode, bs, ctx, page_size, args.prefill_backends)
                    torch.cuda.empty_cache()
    report = dict(environment=env, shape=dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16",
                                              extend_new_tokens=NEW_TOKENS),
                  timing="triton.testing.do_bench median ms; meta = init_forward_metadata, layer = forward",
                  attention=rows, sampling=attempt("sampling", lambda: check_sampling(args.batch_sizes)) or [])
    if args.export_aot:
        report["exported_aot"] = export_aot(args.export_aot)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['wall_seconds']} s)")
    bad = [r for r in rows if not r.get("flashinfer_ok")]
    bad += [r for r in rows if r.get("flashinfer_max_err") is not None and r["flashinfer_max_err"] > 5e-2]
    if bad or not report["sampling"] or not all(r["greedy_identical"] for r in report["sampling"]):
        sys.exit(f"check_flashinfer: {len(bad)} attention case(s) failed or off the reference; see above")


if __name__ == "__main__":
    main()
