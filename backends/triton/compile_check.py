"""Compile every kernel here for a GPU this machine does not have (H100: cuda:90, MI300: hip:gfx942),
with the tiles a vendor's KernelConfig gives, to catch compile errors without the hardware.

    python -m backends.triton.compile_check --target cuda:90 --target hip:gfx942

Needs triton's compiler for the target (the pip wheel ships NVIDIA and AMD); runs no kernel.
"""
from __future__ import annotations

import argparse
import logging
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from backends.triton.decode_attention import _decode_partial_kernel, _decode_reduce_kernel
from backends.triton.extend_attention import _extend_kernel
from backends.triton.fused_moe import ALIGN_BLOCK_P, _align_kernel, _moe_gemm_kernel, _moe_sum_kernel, gemm_tiles
from backends.triton.gemv import _gemv_kernel, _gemv_tile_kernel
from backends.triton.kv_store import _store_kv_kernel
from backends.triton.layer_ops import (_gelu_tanh_and_mul_kernel, _gemma_rms_norm_kernel, _rms_norm_kernel,
                                      _rotary_kernel, _silu_and_mul_kernel)
from backends.triton.tl_helpers import next_pow2
from hal.kernel_config import KernelConfig

logger = logging.getLogger(__name__)
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# --kv-cache-dtype fp8_e4m3 / fp8_e5m2 as each vendor's pool holds them (Triton's names), and the
# largest finite value stores saturate at
FP8_KV = {"cuda": {"fp8e4nv": 448.0, "fp8e5": 57344.0}, "hip": {"fp8e4b8": 240.0, "fp8e5b16": 57344.0}}


def _config(backend: str) -> KernelConfig:
    if backend == "hip":
        from backends.rocm.platform import CDNA3_KERNEL_CONFIG
        return CDNA3_KERNEL_CONFIG
    from backends.cuda.platform import CUDA_KERNEL_CONFIG
    return CUDA_KERNEL_CONFIG


def kernel_cases(cfg: KernelConfig, dt: str, head_dim: int, num_q_heads: int = 32, num_kv_heads: int = 8,
                 pdl: bool = False, kv_dt: str = "", kv_limit: float = 0.0):
    """(kernel, pointer/scalar types, constexprs, num_warps, num_stages) as the launchers pass them;
    with ``pdl``, the kernels that can be launched with programmatic dependent launch are. With
    ``kv_dt`` (an fp8 pool saturating at ``kv_limit``), only the kernels that touch the pool."""
    d, p = next_pow2(head_dim), f"*{dt}"
    group = num_q_heads // num_kv_heads
    bm, bn, stages = cfg.extend_tiles(head_dim, ELEM_BYTES[dt])
    dn, dstages = cfg.decode_tiles(head_dim, 1 if kv_dt else ELEM_BYTES[dt])
    fp32 = dt == "fp32"
    idx = {"ReqToToken": "*i32", "ReqPoolIdx": "*i64", "SeqLens": "*i64", "PrefixLens": "*i64",
           "ExtendLens": "*i64", "ExtendStarts": "*i64", "Loc": "*i64", "PartialO": "*fp32",
           "PartialLse": "*fp32", "qk_scale": "fp32", "eps": "fp32", "OutLoc": "*i64", "SortedPairs": "*i32",
           "BlockExpert": "*i32", "NumUsed": "*i32", "TopkWeights": "*fp32", "TopkIds": "*i64"}
    ptrs = {n: p for n in ("Q", "K", "V", "KBuf", "VBuf", "Out", "X", "R", "W", "B", "ResOut", "Cos", "Sin",
                           "QOut", "KOut", "KNew", "VNew", "G", "A", "Y")}
    types = {**ptrs, **idx}
    if kv_dt:
        types.update(KBuf=f"*{kv_dt}", VBuf=f"*{kv_dt}")
    ew = cfg.elementwise_num_warps
    decode = dict(GROUP=group, HEAD_DIM=head_dim, MIN_SPLIT=max(dn, cfg.min_split_tokens),
                  BLOCK_H=max(16, next_pow2(group)), BLOCK_D=d, BLOCK_N=dn, FP32_DOT=fp32, STORE_LIMIT=kv_limit,
                  USE_PDL=pdl)
    kv_cases = [
        # splits, rotary and the KV store inside (decode steps)
        (_decode_partial_kernel, types, dict(decode, DIRECT=False, ROTARY=True), cfg.decode_num_warps, dstages),
        # splits, q and k rotated before (direct callers)
        (_decode_partial_kernel, types, dict(decode, DIRECT=False, ROTARY=False), cfg.decode_num_warps, dstages),
        # one split: stage 1 writes the output (large batches)
        (_decode_partial_kernel, types, dict(decode, DIRECT=True, ROTARY=True), cfg.decode_num_warps, dstages),
        (_extend_kernel, types, dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                                     FP32_DOT=fp32), cfg.extend_num_warps, stages),
        (_store_kv_kernel, types, dict(ROW=num_kv_heads * head_dim, BLOCK=min(4096, next_pow2(num_kv_heads * head_dim)),
                                       STORE_LIMIT=kv_limit, USE_PDL=pdl), ew, 1),
    ]
    if kv_dt:
        return kv_cases
    return kv_cases + [
        (_decode_reduce_kernel, types, dict(HEAD_DIM=head_dim, MIN_SPLIT=max(dn, cfg.min_split_tokens), BLOCK_N=dn,
                                            MAX_SPLITS=cfg.max_kv_splits, BLOCK_D=d, USE_PDL=pdl), 4, 1),
        (_rms_norm_kernel, types, dict(N=4096, HAS_RESIDUAL=True, BLOCK=4096, USE_PDL=pdl), ew, 1),
        (_silu_and_mul_kernel, types, dict(D=14336, BLOCK=2048, USE_PDL=pdl), ew, 1),
        (_gemma_rms_norm_kernel, types, dict(N=256, BLOCK=256, USE_PDL=pdl), ew, 1),
        (_gelu_tanh_and_mul_kernel, types, dict(D=6912, BLOCK=2048, USE_PDL=pdl), ew, 1),
        (_rotary_kernel, types, dict(HQ=num_q_heads, HKV=num_kv_heads, HALF=head_dim // 2, BLOCK_HQ=num_q_heads,
                                     BLOCK_HKV=num_kv_heads, BLOCK_HALF=next_pow2(head_dim // 2), USE_PDL=pdl),
         ew, 1),
    ] + [(_gemv_kernel, types, dict(SILU_MUL=silu, NORM=norm, HAS_BIAS=False, HAS_RES=res, EVEN_W=True,
                                    EVEN_K=True, BLOCK_N=cfg.gemv_block_n, BLOCK_K=cfg.gemv_block_k,
                                    NUM_STAGES=cfg.gemv_num_stages, USE_PDL=pdl),
          cfg.gemv_num_warps, cfg.gemv_num_stages)
         # as a decoder layer calls them: q/k/v and gate/up (norm), o (residual), down (SiLU, residual)
         for silu, norm, res in ((False, True, False), (False, False, True), (True, False, True))
    ] + [(_gemv_tile_kernel, types, dict(HAS_BIAS=False, HAS_RES=res, EVEN_W=True, FP32_DOT=fp32, BLOCK_M=16,
                                         BLOCK_N=cfg.gemv_tile_n, BLOCK_K=cfg.gemv_tile_k,
                                         NUM_STAGES=cfg.gemv_tile_num_stages, USE_PDL=pdl),
          cfg.gemv_tile_num_warps, cfg.gemv_tile_num_stages)
         for res in (False, True)     # q/k/v and gate/up; o and down (residual)
    ] + moe_cases(cfg, dt, types)


def moe_cases(cfg: KernelConfig, dt: str, types: dict, top_k: int = 2, hidden: int = 4096, inter: int = 14336):
    """The fused MoE's kernels as fused_moe launches them at Mixtral-8x7B's shapes: the alignment (int64
    and int32 ids, Qwen3-MoE's 128 experts), both passes (gate/up with SiLU-and-mul; down) at decode's
    16-row blocks and the config's largest, and the weighted sum."""
    cases = [(_align_kernel, dict(types, TopkIds=ids), dict(BLOCK_M=16, BLOCK_P=ALIGN_BLOCK_P, BLOCK_E=128), 4, 1)
             for ids in ("*i64", "*i32")]
    for block_m in sorted({16, cfg.moe_block_m}):
        for silu, n, k, rows_per_a in ((True, inter, hidden, top_k), (False, hidden, inter, 1)):
            bn, bk, stages = gemm_tiles(block_m, n, k, silu, ELEM_BYTES[dt], cfg.moe_block_n, cfg.moe_block_k,
                                        cfg.moe_num_stages, cfg.shared_memory_bytes)
            cases.append((_moe_gemm_kernel, types, dict(ROWS_PER_A=rows_per_a, SILU_MUL=silu, EVEN_K=k % bk == 0,
                                                        FP32_DOT=dt == "fp32", BLOCK_M=block_m, BLOCK_N=bn,
                                                        BLOCK_K=bk, NUM_STAGES=stages), cfg.moe_num_warps, stages))
    return cases + [(_moe_sum_kernel, types, dict(TOP_K=top_k, BLOCK=1024), 4, 1)]


def compile_kernel(fn, types: dict, constexprs: dict, target: GPUTarget, num_warps: int, num_stages: int):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def parse_target(text: str) -> GPUTarget:
    backend, _, arch = text.partition(":")
    if backend == "cuda":
        return GPUTarget("cuda", int(arch), 32)
    if backend == "hip":
        return GPUTarget("hip", arch, 64)
    raise ValueError(f"--target must be cuda:<sm> or hip:<gfx arch>, got {text!r}")


def check(targets: list[GPUTarget], dtypes=("bf16",), head_dims=(128,)) -> list[str]:
    """Compile every case, and the KV kernels over each fp8 pool; returns the failures (empty
    when all compiled)."""
    failures = []
    for target in targets:
        cfg = _config(target.backend)
        pools = [("", 0.0)] + list(FP8_KV[target.backend].items())
        for dt, head_dim, (kv_dt, limit) in ((d, h, k) for d in dtypes for h in head_dims for k in pools):
            pdl = target.backend == "cuda" and int(target.arch) >= 90
            for fn, types, consts, warps, stages in kernel_cases(cfg, dt, head_dim, pdl=pdl, kv_dt=kv_dt,
                                                                 kv_limit=limit):
                name = (f"{target.backend}:{target.arch} {fn.fn.__name__} {dt} head_dim={head_dim}"
                        + (f" kv={kv_dt}" if kv_dt else ""))
                try:
                    compiled = compile_kernel(fn, types, consts, target, warps, stages)
                    logger.info("%s: ok (%d bytes shared memory)", name, compiled.metadata.shared)
                except Exception as e:  # noqa: BLE001 - report every failing kernel, not the first
                    failures.append(f"{name}: {type(e).__name__}: {e}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", default=[], help="cuda:<sm> or hip:<gfx arch> (repeat)")
    parser.add_argument("--dtype", action="append", default=[], choices=sorted(ELEM_BYTES))
    parser.add_argument("--head-dim", action="append", type=int, default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failures = check([parse_target(t) for t in args.target or ["cuda:90", "hip:gfx942"]],
                     tuple(args.dtype or ["bf16"]), tuple(args.head_dim or [128]))
    for f in failures:
        logger.error("FAILED %s", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
