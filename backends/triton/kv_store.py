"""The write of new K and V into the paged pool: one fused kernel for both, casting to the
pool's dtype (saturating into fp8). Slot ``out_cache_loc[t]`` receives token t's [num_kv_heads, head_dim] row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.tl_helpers import kv_limit, next_pow2, pdl_launch, pdl_launch_dependents, pdl_wait, to_pool


@triton.jit
def _store_kv_kernel(K, V, KBuf, VBuf, Loc, stride_kt, stride_vt, stride_buf,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, STORE_LIMIT: tl.constexpr,
                     USE_PDL: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ROW
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    slot = tl.load(Loc + t).to(tl.int64)
    t64 = t.to(tl.int64)
    k = tl.load(K + t64 * stride_kt + cols, mask=mask)
    v = tl.load(V + t64 * stride_vt + cols, mask=mask)
    tl.store(KBuf + slot * stride_buf + cols, to_pool(k, KBuf.dtype.element_ty, STORE_LIMIT), mask=mask)
    tl.store(VBuf + slot * stride_buf + cols, to_pool(v, VBuf.dtype.element_ty, STORE_LIMIT), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with each token's H * D values contiguous (a view when they already are)."""
    t, h, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        x = x.contiguous()
    return x


def store_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, num_warps: int = 4, pdl: bool = False) -> None:
    """k_buf, v_buf: [capacity, Hkv, D] contiguous; loc: [T] int slots; k, v: [T, Hkv, D]."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("the KV pool buffers must be contiguous")
    k, v = _rows(k), _rows(v)
    row = k.shape[1] * k.shape[2]
    block = min(next_pow2(row), 4096)
    grid = (num_tokens, triton.cdiv(row, block))
    _store_kv_kernel[grid](k, v, k_buf, v_buf, loc, k.stride(0), v.stride(0), k_buf.stride(0),
                           ROW=row, BLOCK=block, STORE_LIMIT=kv_limit(k_buf.dtype), num_warps=num_warps,
                           **pdl_launch(pdl))
