"""A matrix-vector product for the few-row linears of small decode batches.

At batch 1 a decoder layer's linears are pure weight streaming: each weight byte is read once
and used for one multiply-add. cuBLAS reaches ~97% of the copy bandwidth on the largest
projection but 73-76% on the smaller q/k/v and o projections, and splits the down projection
along K with a separate reduce kernel (benchmarks/RESULTS.md, H200). This kernel gives each
program BLOCK_N output features and streams their rows of W along K, so no reduce is needed,
and can take the MLP's [gate | up] activations and apply SiLU-and-mul while it loads them,
which removes that kernel too. It can also norm its input (RMSNorm: the programs sum the squares
of the x chunks they load anyway and scale their dot products by 1 / rms at the end, so the norm
costs no pass of its own) and add a residual to its output.

From 2 rows on (small decode batches) a tile kernel takes over: each program streams its rows of W
once and multiplies them by a tile of 16 or 32 rows of x on the tensor cores, the residual add in
its epilogue (1.05x cuBLAS per Llama-3.1-8B layer at 2-16 rows on the H200, where cuBLAS runs o
and down split-K with a reduce kernel). Its x goes to the tensor cores untouched, so the norm and
SiLU-and-mul run as their own kernels first there (see _gemv_tile_kernel).

out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ residual[m, n]), fp32 accumulation, rounded
once at the end; with a norm, x[m, k] * g[k] / rms(x[m]) in place of x[m, k].
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from backends.triton.tl_helpers import fit_stages, fp32_dot, mma, next_pow2, pdl_launch, pdl_launch_dependents, pdl_wait


@triton.jit
def _load_x(x_row, g_ptr, ks, K, SILU_MUL: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """(x[k0:k0 + BLOCK_K] in fp32, its squares or 0). SILU_MUL: of silu_and_mul([gate | up]).
    NORM: times the norm weight g (the 1 / rms factor comes at the end)."""
    if EVEN_K:
        x = tl.load(x_row + ks)
    else:
        x = tl.load(x_row + ks, mask=ks < K, other=0.0)
    if SILU_MUL:
        # silu(gate) rounded as F.silu's output is, times up, rounded as the separate kernel's
        # output is (layer_ops.silu_and_mul)
        if EVEN_K:
            up = tl.load(x_row + K + ks)
        else:
            up = tl.load(x_row + K + ks, mask=ks < K, other=0.0)
        gate = x.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
        x = (silu * up.to(tl.float32)).to(up.dtype)
    xf = x.to(tl.float32)
    sq = tl.zeros_like(xf)
    if NORM:
        sq = xf * xf
        if EVEN_K:
            xf = xf * tl.load(g_ptr + ks).to(tl.float32)
        else:
            xf = xf * tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    return xf, sq


@triton.jit
def _load_w(w_rows, ks, n_mask, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_rows + ks[None, :])
    return tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(X, W, B, Out, R, G, stride_xm, stride_wn, stride_om, stride_rm, out_features, in_features,
                 eps, SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr, EVEN_W: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """One row of x: each program's products are summed along K in registers until the end."""
    N = out_features
    K = in_features
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    x_row = X + m * stride_xm
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    pdl_launch_dependents(USE_PDL)
    k_start = 0
    if USE_PDL:
        # the first tile of W (no kernel's output) is read while the kernel before this one is
        # still finishing; x only after the wait
        w = _load_w(w_rows, offs_k, n_mask, K, EVEN_W)
        pdl_wait(USE_PDL)
        xk, xsq = _load_x(x_row, G, offs_k, K, SILU_MUL, NORM, EVEN_K)
        acc += w.to(tl.float32) * xk[None, :]
        sq += xsq
        k_start = BLOCK_K
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        xk, xsq = _load_x(x_row, G, ks, K, SILU_MUL, NORM, EVEN_K)
        acc += _load_w(w_rows, ks, n_mask, K, EVEN_W).to(tl.float32) * xk[None, :]
        sq += xsq
    out = tl.sum(acc, axis=1)
    if NORM:
        out = out * tl.rsqrt(tl.sum(sq, 0) / K + eps)
    if HAS_BIAS:
        out += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        out += tl.load(R + m * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Out + m * stride_om + offs_n, out.to(Out.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_tile_kernel(X, W, B, Out, R, stride_xm, stride_wn, stride_om, stride_rm, rows, out_features,
                      in_features, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_W: tl.constexpr,
                      FP32_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    """Several rows: each program streams its BLOCK_N rows of W once and multiplies every chunk
    by the [BLOCK_M, BLOCK_K] tile of x on the tensor cores (rows past the last are masked). x
    goes from memory to the tensor cores untouched: no SiLU-and-mul or norm prologue, which every
    program would redo on the whole tile in registers (2-4x slower at Llama-3.1-8B's projections
    on the H200) where one pass of silu_and_mul or rms_norm does it once."""
    N = out_features
    K = in_features
    pid_n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < rows
    n_mask = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pdl_launch_dependents(USE_PDL)
    k_start = 0
    if USE_PDL:
        w = _load_w(w_rows, offs_k, n_mask, K, EVEN_W)
        pdl_wait(USE_PDL)
        xk = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc += mma(xk, tl.trans(w), FP32_DOT)
        k_start = BLOCK_K
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        w = _load_w(w_rows, ks, n_mask, K, EVEN_W)
        xk = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
        acc += mma(xk, tl.trans(w), FP32_DOT)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(R + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=mask)


# rows up to this go through _gemv_kernel (CUDA cores), more through _gemv_tile_kernel (tensor
# cores). Two or four rows a program on the CUDA cores were no faster than cuBLAS (H200).
ROW_KERNEL_MAX_ROWS = 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
         silu_mul_input: bool = False, residual: Optional[torch.Tensor] = None,
         norm: Optional[tuple[torch.Tensor, float]] = None, block_n: int = 8, block_k: int = 512,
         num_warps: int = 4, num_stages: int = 3, tile_n: int = 32, tile_k: int = 256, tile_num_warps: int = 4,
         tile_num_stages: int = 4, smem_bytes: int = 99 * 1024, pdl: bool = False) -> torch.Tensor:
    """x: [..., K] (or [..., 2K] = [gate | up] with ``silu_mul_input``); weight: [N, K] with unit
    stride along K -> [..., N] in x's dtype, plus ``residual`` [..., N] if given. norm = (g [K],
    eps): the product is of rms_norm(x) * g (in fp32: the separate norm rounds twice, this does
    not). One row: one program per block_n features (``_gemv_kernel``); more: one per tile_n
    features and 16 or 32 rows (``_gemv_tile_kernel``; no SiLU-and-mul input or norm there), its
    stages and then tile_k cut until they fit in ``smem_bytes``."""
    n, k = weight.shape
    width = 2 * k if silu_mul_input else k
    if x.shape[-1] != width:
        raise ValueError(f"gemv: x has {x.shape[-1]} features, the weight {tuple(weight.shape)} needs {width}")
    if norm is not None and silu_mul_input:
        raise ValueError("gemv: a norm of a SiLU-and-mul input is not supported")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    r2 = out
    if residual is not None:
        r2 = residual.reshape(rows, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    g, eps = norm if norm is not None else (weight, 0.0)
    b = bias if bias is not None else weight
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, **pdl_launch(pdl))
    if rows == 1:
        block_k = min(block_k, next_pow2(k))
        _gemv_kernel[(triton.cdiv(n, block_n), rows)](
            x2, weight, b, out, r2, g, x2.stride(0), weight.stride(0), out.stride(0), r2.stride(0), n, k,
            float(eps), EVEN_W=n % block_n == 0 and k % block_k == 0, EVEN_K=k % block_k == 0, BLOCK_N=block_n,
            BLOCK_K=block_k, NUM_STAGES=num_stages, num_warps=num_warps, SILU_MUL=silu_mul_input,
            NORM=norm is not None, **flags)
    elif rows:
        if silu_mul_input or norm is not None:
            raise ValueError(f"gemv: a SiLU-and-mul input or a norm needs at most {ROW_KERNEL_MAX_ROWS} row "
                             f"(got {rows}); apply silu_and_mul or rms_norm first")
        block_m = 16 if rows <= 16 else 32   # 64 rows spill registers (and serialize wgmma) on sm_90
        tile_k = min(tile_k, max(16, next_pow2(k)))
        # a stage holds the x tile and the W tile
        stages, tile_k = fit_stages(lambda bk: bk * (block_m + tile_n) * x.element_size(), tile_num_stages, tile_k,
                                    smem_bytes)
        _gemv_tile_kernel[(triton.cdiv(n, tile_n), triton.cdiv(rows, block_m))](
            x2, weight, b, out, r2, x2.stride(0), weight.stride(0), out.stride(0), r2.stride(0), rows, n, k,
            EVEN_W=n % tile_n == 0 and k % tile_k == 0, FP32_DOT=fp32_dot(x.dtype), BLOCK_M=block_m,
            BLOCK_N=tile_n, BLOCK_K=tile_k, NUM_STAGES=stages, num_warps=tile_num_warps, num_stages=stages,
            **flags)
    return out.view(*x.shape[:-1], n)
