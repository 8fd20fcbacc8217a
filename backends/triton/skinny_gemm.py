"""A GEMM for the mid-sized decode batches (tens to a hundred-odd rows): one pass over the weights.

At 17-128 rows a decoder layer's linears still mostly stream their weights, yet cuBLAS reads them
at 74-91% of the copy bandwidth there (H100, Llama-3.1-8B's projections). This kernel swaps the
operands of the usual GEMM: each program takes BLOCK_N rows of W as the tensor-core MMA's M side
and all the rows of x (padded to a power of two) as its N side, so every row of the batch rides on
one read of the weights and the grid is the output features alone (BLOCK_N each). Where that grid
is small next to K, the K range is split (at most ``k_per_split`` per program): each split writes
fp32 partial sums and a second kernel adds them up with the bias and residual, in a fixed order
(deterministic, no atomics). On the H100 it is 1.02x cuBLAS per layer at 24 rows, level with it at 32-48
and slower from 64 (o at every size), so CUDA takes it up to 48 rows (benchmarks/RESULTS.md).

out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ residual[m, n]), fp32 accumulation, rounded
once at the end.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from backends.triton.tl_helpers import fit_stages, fp32_dot, mma, next_pow2

# rows past this pad the MMA's N side too far: the fp32 accumulator of 64 x 256 no longer fits
# the registers, and cuBLAS is faster there anyway
MAX_ROWS = 128


@triton.jit
def _skinny_kernel(X, W, B, Out, R, P, rows, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_rm,
                   stride_ps, stride_pm, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                   EVEN: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One (BLOCK_N output features, K split): acc^T[BLOCK_N, BLOCK_M] = W tile @ x tile^T."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < rows
    n_mask = offs_n < N
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = X + offs_m.to(tl.int64)[None, :] * stride_xm
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        if EVEN:
            w = tl.load(w_rows + ks[None, :])                                           # [BLOCK_N, BLOCK_K]
        else:
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < k_hi)[None, :], other=0.0)
        xt = tl.load(x_cols + ks[:, None], mask=m_mask[None, :] & (ks < k_hi)[:, None], other=0.0)  # [BK, BM]
        acc += mma(w, xt, FP32_DOT)
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        tl.store(P + split * stride_ps + offs_m[None, :] * stride_pm + offs_n[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_RES:
            acc += tl.load(R + offs_m.to(tl.int64)[None, :] * stride_rm + offs_n[:, None], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(Out + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None], acc.to(Out.dtype.element_ty),
                 mask=mask)


@triton.jit
def _split_sum_kernel(P, B, Out, R, N, stride_ps, stride_pm, stride_om, stride_rm, SPLITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One (row, BLOCK features): the splits' partial sums in order, + bias + residual, rounded once."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(P + s * stride_ps + m * stride_pm + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(R + m * stride_rm + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + m * stride_om + offs, acc.to(Out.dtype.element_ty), mask=mask)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                residual: Optional[torch.Tensor] = None, block_n: int = 64, block_k: int = 128,
                k_per_split: int = 8192, num_warps: int = 4, num_stages: int = 4,
                smem_bytes: int = 227 * 1024) -> torch.Tensor:
    """x: [..., K] with at most MAX_ROWS rows; weight: [N, K] -> [..., N] in x's dtype, plus bias [N]
    and ``residual`` [..., N] if given. Each program streams ``block_n`` rows of the weight along at
    most ``k_per_split`` of K (rounded up to whole ``block_k`` chunks); its stages, then block_k,
    are cut until they fit in ``smem_bytes``."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"skinny_gemm: x has {x.shape[-1]} features, the weight {tuple(weight.shape)} needs {k}")
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"skinny_gemm: at most {MAX_ROWS} rows, got {rows}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.view(*x.shape[:-1], n)
    r2 = out
    if residual is not None:
        r2 = residual.reshape(rows, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    b = bias if bias is not None else weight
    block_m = max(16, next_pow2(rows))
    block_k = min(block_k, max(16, next_pow2(k)))
    # a stage holds the W tile and the x tile
    num_stages, block_k = fit_stages(lambda bk: bk * (block_n + block_m) * x.element_size(), num_stages, block_k,
                                     smem_bytes)
    splits = triton.cdiv(k, max(k_per_split, block_k))
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k     # even splits, whole chunks
    splits = triton.cdiv(k, per_split)
    part = (torch.empty((splits, rows, n), dtype=torch.float32, device=x.device) if splits > 1 else out)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    _skinny_kernel[(triton.cdiv(n, block_n), splits)](
        x2, weight, b, out, r2, part, rows, n, k, per_split, x2.stride(0), weight.stride(0), out.stride(0),
        r2.stride(0), part.stride(0), part.stride(1) if splits > 1 else 0, SPLIT=splits > 1,
        EVEN=n % block_n == 0 and k % block_k == 0, FP32_DOT=fp32_dot(x.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, num_warps=num_warps, **flags)
    if splits > 1:
        block = min(1024, next_pow2(n))
        _split_sum_kernel[(rows, triton.cdiv(n, block))](
            part, b, out, r2, n, part.stride(0), part.stride(1), out.stride(0), r2.stride(0), SPLITS=splits,
            BLOCK=block, num_warps=4, **flags)
    return out.view(*x.shape[:-1], n)
