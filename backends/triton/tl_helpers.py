"""Small pieces every Triton kernel here shares: the dot product that stays exact in fp32, and
how a launcher decides on it."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.mem_cache.kv_pool import is_fp8


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether dots run on fp32 operands in IEEE precision: for fp32 models (tf32 would lose
    digits the reference keeps), and in the interpreter, whose bf16 dot is wrong."""
    return dtype == torch.float32 or interpreting()


def fit_stages(stage_bytes, stages: int, block_k: int, smem_bytes: int) -> tuple[int, int]:
    """(stages, block_k) of a K-streaming kernel whose pipeline stage takes ``stage_bytes(block_k)``
    of shared memory: stages cut (down to 2), then block_k halved (down to 32), until they fit in
    ``smem_bytes``."""
    while stages * stage_bytes(block_k) > smem_bytes and stages > 2:
        stages -= 1
    while stages * stage_bytes(block_k) > smem_bytes and block_k > 32:
        block_k //= 2
    return stages, block_k


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


@triton.jit
def mma(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if FP32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def kv_limit(dtype: torch.dtype) -> float:
    """The STORE_LIMIT of a KV pool of ``dtype``: its largest finite value for an 8-bit float
    (stores saturate there), 0.0 (no clamp) otherwise."""
    return float(torch.finfo(dtype).max) if is_fp8(dtype) else 0.0


@triton.jit
def to_pool(x, dtype, STORE_LIMIT: tl.constexpr):
    """x converted for a store into a KV pool of ``dtype``, saturating at STORE_LIMIT when it is
    not 0 (fp8 pools: conversions past the range give inf or NaN on some devices)."""
    if STORE_LIMIT > 0:
        x = tl.clamp(x.to(tl.float32), -STORE_LIMIT, STORE_LIMIT)
    return x.to(dtype)


# Programmatic dependent launch (NVIDIA sm90+, KernelConfig.pdl): a kernel launched with it may
# start while the kernel before it in the stream is still running, as soon as every program of
# that one has called pdl_launch_dependents. Until pdl_wait returns it may only compute indices
# and read what no earlier kernel writes (weights); after it, everything earlier in the stream
# is complete and visible. Every program of such a kernel calls pdl_wait before it writes
# anything, so the ordering stays transitive along a chain of them.
@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


def pdl_launch(enabled: bool) -> dict:
    """Launch keyword arguments for a kernel with a USE_PDL constexpr."""
    return dict(USE_PDL=True, launch_pdl=True) if enabled else dict(USE_PDL=False)
