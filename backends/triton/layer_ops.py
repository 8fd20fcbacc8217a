"""The fused layer ops in Triton: RMSNorm (with the residual add), Gemma's RMSNorm, SiLU-and-mul,
GELU(tanh)-and-mul and neox rotary, one kernel each, fp32 math, rounding where the torch reference
rounds (engine/layers); the linears' GEMV and skinny GEMM, and the mixture-of-experts MLP
(fused_moe.py), graph-capturable."""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from backends.triton import skinny_gemm as skinny
from backends.triton.fused_moe import fused_moe
from backends.triton.gemv import ROW_KERNEL_MAX_ROWS, gemv
from backends.triton.tl_helpers import next_pow2, pdl_launch, pdl_launch_dependents, pdl_wait
from hal.kernel_config import KernelConfig
from hal.layer_ops import LayerOps
from hal.platform import platform_for_device


@triton.jit
def _rms_norm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, eps,
                     N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    pdl_launch_dependents(USE_PDL)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)             # a weight: before the wait
    pdl_wait(USE_PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activation dtype, as the reference adds in that dtype
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    h = (xf * rstd).to(x.dtype).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (h * w).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + D + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)  # rounded, as F.silu's output is
    tl.store(Out + row * stride_o + cols, (silu * up.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gemma_rms_norm_kernel(X, W, Out, stride_x, stride_o, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    pdl_launch_dependents(USE_PDL)
    scale = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + 1.0     # a weight: before the wait
    pdl_wait(USE_PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    # one rounding, of the whole fp32 product (the reference's order)
    tl.store(Out + row * stride_o + cols, (x * rstd * scale).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_and_mul_kernel(X, Out, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + D + cols, mask=mask, other=0.0)
    # 0.5 (1 + tanh(z)) = sigmoid(2z), z = sqrt(2 / pi) (g + 0.044715 g^3): no tanh needed, and
    # exp overflowing to inf for very negative g still gives 0
    z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    gelu = (gate / (1.0 + tl.exp(-2.0 * z))).to(up.dtype).to(tl.float32)  # rounded, as F.gelu's output is
    tl.store(Out + row * stride_o + cols, (gelu * up.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(X, Out, t, cos, sin, stride_xt, stride_xh, stride_ot, stride_oh, offs_j, j_mask,
            HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < HEADS)[:, None] & j_mask[None, :]
    src = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)                  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = Out + t * stride_ot + offs_h[:, None] * stride_oh + offs_j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, QOut, KOut, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, stride_st, stride_qot, stride_qoh, stride_kot, stride_koh,
                   HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_HALF)
    j_mask = offs_j < HALF
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    cos = tl.load(Cos + t * stride_ct + offs_j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * stride_st + offs_j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    _rotate(Q, QOut, t, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh, offs_j, j_mask,
            HQ, HALF, BLOCK_HQ)
    _rotate(K, KOut, t, cos, sin, stride_kt, stride_kh, stride_kot, stride_koh, offs_j, j_mask,
            HKV, HALF, BLOCK_HKV)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x viewed as [rows, n] with unit stride along n (a copy only when no such view exists)."""
    x2 = x.reshape(-1, n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _warps(block: int, base: int) -> int:
    return min(16, max(base, block // 1024))


class TritonLayerOps(LayerOps):
    name = "triton"
    fused_moe_graph_safe = True     # fused_moe reads nothing back to the host (backends/triton/fused_moe.py)

    def __init__(self, device: Optional[torch.device] = None, kernel_config: Optional[KernelConfig] = None) -> None:
        super().__init__(device)
        if kernel_config is None and device is not None:
            kernel_config = platform_for_device(torch.device(device)).kernel_config()
        cfg = kernel_config or KernelConfig()
        self.num_warps = cfg.elementwise_num_warps
        self.gemv_max_rows = cfg.gemv_max_rows
        self.gemv_fuse_norm = bool(cfg.gemv_fuse_norm)
        self.pdl = bool(cfg.pdl)
        self._pdl_kw = pdl_launch(self.pdl)          # the element-wise launches' PDL arguments
        self.gemv_launch = dict(block_n=cfg.gemv_block_n, block_k=cfg.gemv_block_k,
                                num_warps=cfg.gemv_num_warps, num_stages=cfg.gemv_num_stages,
                                tile_n=cfg.gemv_tile_n, tile_k=cfg.gemv_tile_k,
                                tile_num_warps=cfg.gemv_tile_num_warps,
                                tile_num_stages=cfg.gemv_tile_num_stages,
                                smem_bytes=cfg.shared_memory_bytes, pdl=self.pdl)
        self.skinny_max_rows = min(cfg.skinny_max_rows, skinny.MAX_ROWS)
        self.skinny_launch = dict(block_n=cfg.skinny_block_n, block_k=cfg.skinny_block_k,
                                  k_per_split=cfg.skinny_k_per_split, num_warps=cfg.skinny_num_warps,
                                  num_stages=cfg.skinny_num_stages, smem_bytes=cfg.shared_memory_bytes)
        self.moe_launch = dict(block_m=cfg.moe_block_m, block_n=cfg.moe_block_n, block_k=cfg.moe_block_k,
                               num_warps=cfg.moe_num_warps, num_stages=cfg.moe_num_stages,
                               smem_bytes=cfg.shared_memory_bytes)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               silu_mul_input: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The GEMV (backends/triton/gemv.py) for at most ``gemv_max_rows`` rows, the one-pass GEMM
        (skinny_gemm.py) for at most ``skinny_max_rows``, the vendor BLAS otherwise."""
        if self._gemv_rows(x, weight):
            if silu_mul_input and self._rows(x) > ROW_KERNEL_MAX_ROWS:
                x, silu_mul_input = self.silu_and_mul(x), False    # the tile kernel takes no SiLU input
            return gemv(x, weight, bias, silu_mul_input=silu_mul_input, residual=residual, **self.gemv_launch)
        if self._own_kernel_rows(x, weight, self.skinny_max_rows):
            if silu_mul_input:
                x = self.silu_and_mul(x)
            return skinny.skinny_gemm(x, weight, bias, residual=residual, **self.skinny_launch)
        return super().linear(x, weight, bias, silu_mul_input=silu_mul_input, residual=residual)

    def rms_norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Where the one-row GEMV runs, the norm is folded into it (``KernelConfig.gemv_fuse_norm``)."""
        if (self.gemv_fuse_norm and self._gemv_rows(x, weight) and self._rows(x) <= ROW_KERNEL_MAX_ROWS
                and norm_weight.dtype == x.dtype):
            return gemv(x, weight, bias, norm=(norm_weight, eps), **self.gemv_launch)
        return super().rms_norm_linear(x, norm_weight, eps, weight, bias)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs over the pairs sorted by expert on the device (SiLU-and-mul in the first's
        epilogue) and a weighted sum: a fixed launch shape for each T, so it can be captured in a graph."""
        return fused_moe(x, w13, w2, topk_weights, topk_ids, **self.moe_launch)

    @staticmethod
    def _rows(x: torch.Tensor) -> int:
        return x.numel() // max(1, x.shape[-1])

    def _gemv_rows(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self._own_kernel_rows(x, weight, self.gemv_max_rows)

    def _own_kernel_rows(self, x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
        """Whether one of our GEMV/GEMM kernels of at most ``max_rows`` rows takes this product."""
        return 0 < self._rows(x) <= max_rows and weight.dtype == x.dtype and weight.dim() == 2

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n = x.shape[-1]
        x2 = _rows(x, n)                                                     # [rows, n]
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
        r2 = _rows(residual, n) if residual is not None else x2
        if x2.shape[0]:
            block = next_pow2(n)
            _rms_norm_kernel[(x2.shape[0],)](
                x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), n, n, float(eps),
                N=n, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block, self.num_warps),
                **self._pdl_kw)
        return out if residual is None else (out, res_out)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        x2 = _rows(x, 2 * d)                                                 # [rows, 2d]
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = min(next_pow2(d), 2048)
            _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
                x2, out, x2.stride(0), d, D=d, BLOCK=block, num_warps=_warps(block, self.num_warps),
                **self._pdl_kw)
        return out

    def gemma_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = _rows(x, n)                                                     # [rows, n]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = next_pow2(n)
            _gemma_rms_norm_kernel[(x2.shape[0],)](
                x2, weight, out, x2.stride(0), n, float(eps), N=n, BLOCK=block,
                num_warps=_warps(block, self.num_warps), **self._pdl_kw)
        return out

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        x2 = _rows(x, 2 * d)                                                 # [rows, 2d]
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = min(next_pow2(d), 2048)
            _gelu_tanh_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
                x2, out, x2.stride(0), d, D=d, BLOCK=block, num_warps=_warps(block, self.num_warps),
                **self._pdl_kw)
        return out

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        t, hq, d = q.shape
        hkv, half = k.shape[1], d // 2
        if cos.shape[0] != t or cos.shape[-1] != half:
            raise ValueError(f"cos/sin must be [{t}, 1, {half}] for q {tuple(q.shape)}, got {tuple(cos.shape)}")
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
            k.shape, dtype=k.dtype, device=k.device)
        if t:
            block_half, block_hq, block_hkv = next_pow2(half), max(2, next_pow2(hq)), max(2, next_pow2(hkv))
            _rotary_kernel[(t,)](
                q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1), k_out.stride(0),
                k_out.stride(1), HQ=hq, HKV=hkv, HALF=half, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv,
                BLOCK_HALF=block_half, num_warps=_warps(block_hq * block_half, self.num_warps),
                **self._pdl_kw)
        return q_out, k_out
