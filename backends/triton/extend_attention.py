"""Paged extend attention: each request's new tokens attend to its cached prefix and causally to
each other, for a packed batch of requests with different prefix and new lengths.

One program per (request, q head, block of new tokens). The new K/V are already in the pool
(the backend stores them first), so prefix and new positions are read the same way, through
``req_to_token``; the causal rule is one mask, key position <= query position, and a sliding
window W adds key position > query position - W (a runtime argument: one compiled kernel serves
every layer); a block of queries starts reading at the first key its first query sees. Softmax
runs in base 2 with fp32 statistics and accumulator. K and V are converted to q's dtype as they are
read, so an fp8 pool costs half the reads and nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from backends.triton.decode_attention import LOG2E, window_arg
from backends.triton.tl_helpers import mma, next_pow2


@triton.jit
def _extend_kernel(
        Q, KBuf, VBuf, Out, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, ExtendStarts,
        qk_scale, window,
        stride_qt, stride_qh, stride_buf_t, stride_buf_h, stride_ot, stride_oh, stride_r2t,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP
    ext_len = tl.load(ExtendLens + b).to(tl.int32)
    prefix = tl.load(PrefixLens + b).to(tl.int32)
    q_start = tl.load(ExtendStarts + b).to(tl.int64)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)

    m_start = m_block * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tokens = q_start + offs_m
    q = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)            # [BLOCK_M, BLOCK_D]
    q_pos = prefix + offs_m                                                     # [BLOCK_M]
    # keys this block needs: positions [first key its first query sees, prefix + last query of the
    # block]; none past the request
    kv_start = tl.maximum(prefix + m_start - window + 1, 0)
    kv_end = tl.where(m_start < ext_len, prefix + tl.minimum(m_start + BLOCK_M, ext_len), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < kv_end
        slot = tl.load(ReqToToken + row * stride_r2t + pos, mask=p_mask, other=0).to(tl.int64)
        kv_offs = slot[:, None] * stride_buf_t + kv_head * stride_buf_h + offs_d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(KBuf + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)      # [BLOCK_N, BLOCK_D]
        s = mma(q, tl.trans(k), FP32_DOT) * qk_scale                           # [BLOCK_M, BLOCK_N]
        seen = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(p_mask[None, :] & seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # with a window a row may see no key of a block yet (all -inf): subtract 0 there, not -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VBuf + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v, FP32_DOT)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor, extend_starts: torch.Tensor,
                     max_extend_len: int, scaling: float, *, block_m: int, block_n: int,
                     num_warps: int, num_stages: int, fp32_dot: bool,
                     sliding_window: Optional[int] = None) -> None:
    """q, out: [T, Hq, D] packed by request; k_buf, v_buf: [capacity, Hkv, D]; per request [B]:
    req_pool_indices, prefix_lens, extend_lens and extend_starts (offset of its first new token
    in q). ``max_extend_len`` is a host int (the grid). sliding_window W: a token at position p
    attends to positions p - W < j <= p only. Writes out."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    batch = extend_lens.shape[0]
    if batch == 0 or max_extend_len == 0:
        return
    grid = (batch, num_q_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_buf, v_buf, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_starts,
        scaling * LOG2E, window_arg(sliding_window),
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=num_q_heads // k_buf.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=next_pow2(head_dim), FP32_DOT=fp32_dot, num_warps=num_warps, num_stages=num_stages)
