"""Paged decode attention with GQA, split along the sequence (flash-decoding).

Stage 1: one program per (request, KV head, split) attends the split's KV positions with every
q head of the group at once and writes a partial output and its log-sum-exp. Stage 2: one
program per (request, q head) merges the splits. With one split (large batches) stage 1 writes
the output itself and stage 2 is not launched. Stage 1 can also rotate q and the new k (neox
rotary) and write the new k and v to the pool (``rotary``), which saves two kernels a layer. A
request's split count grows with its length (at least ``min_split_tokens`` positions per split)
up to ``num_splits``, a host number fixed per batch size, so the launch grid never depends on
device values. A sliding window W (a runtime argument, so one compiled kernel serves every layer)
limits a request to its last W positions: the splits divide those, and nothing before them is
read. Position i of request b lives at KV slot ``req_to_token[req_pool_indices[b], i]``; page size
plays no role here.
Softmax runs in base 2: scores are scaled by log2(e) once. K and V are converted to q's dtype
as they are read (an fp8 pool: half the bytes, the same arithmetic).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from backends.triton.tl_helpers import (kv_limit, mma, next_pow2, pdl_launch, pdl_launch_dependents, pdl_wait,
                                        to_pool)
from hal.kernel_config import KernelConfig

LOG2E = 1.4426950408889634
# the window argument of a layer without a sliding window: longer than any context
FULL_WINDOW = 1 << 30


def window_arg(sliding_window: Optional[int]) -> int:
    """The kernels' ``window`` argument: a layer's sliding window, or FULL_WINDOW without one."""
    if sliding_window is None:
        return FULL_WINDOW
    if not 1 <= sliding_window <= FULL_WINDOW:
        raise ValueError(f"sliding_window must be in [1, {FULL_WINDOW}], got {sliding_window}")
    return sliding_window


@triton.jit
def _split_range(seq_len, window, split, num_splits_cap, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of KV positions that split ``split`` of a seq_len-long request covers: the
    splits share the positions the new token sees, [max(seq_len - window, 0), seq_len)."""
    first = tl.maximum(seq_len - window, 0)
    seen = seq_len - first
    n_splits = tl.minimum(tl.maximum(tl.cdiv(seen, MIN_SPLIT), 1), num_splits_cap)
    split_len = tl.cdiv(tl.cdiv(seen, n_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    return start, end


@triton.jit
def _rotate(x, x_partner, cos, signed_sin):
    """Neox rotary along the last axis in fp32, as the layer ops' rotary kernel computes it (the
    caller rounds once): x_partner[j] is x[j + D/2] for the first half and x[j - D/2] for the
    second, and signed_sin is -sin on the first half."""
    return x.to(tl.float32) * cos + x_partner.to(tl.float32) * signed_sin


@triton.jit
def _decode_partial_kernel(
        Q, KBuf, VBuf, ReqToToken, ReqPoolIdx, SeqLens, PartialO, PartialLse, Out,
        Cos, Sin, KNew, VNew, OutLoc, qk_scale, num_splits_cap, window,
        stride_qt, stride_qh, stride_buf_t, stride_buf_h, stride_r2t,
        stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_ot, stride_oh,
        stride_ct, stride_st, stride_knt, stride_knh, stride_vnt, stride_vnh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, MIN_SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
        DIRECT: tl.constexpr, ROTARY: tl.constexpr, STORE_LIMIT: tl.constexpr, USE_PDL: tl.constexpr):
    """One (request, KV head, split). ROTARY: q and the new token's k arrive unrotated (cos, sin
    of each request's position), and the program whose split holds the new token rotates its k,
    writes k and v to the pool (slot OutLoc[b]) and attends to them from registers."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    start, end = _split_range(seq_len, window, split, num_splits_cap, MIN_SPLIT, BLOCK_N)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    b64 = b.to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = h_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask,
                other=0.0)                                                      # [BLOCK_H, BLOCK_D]
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    loop_end = end
    if ROTARY:
        half: tl.constexpr = HEAD_DIM // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        j = tl.where(first, offs_d, offs_d - half)
        cos = tl.load(Cos + b64 * stride_ct + j, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(Sin + b64 * stride_st + j, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.where(first, -sin, sin)
        q_p = tl.load(Q + b64 * stride_qt + heads[:, None] * stride_qh + partner[None, :], mask=q_mask,
                      other=0.0)
        q = _rotate(q, q_p, cos[None, :], sin[None, :]).to(q.dtype)
        new_pos = seq_len - 1
        holds_new = (start <= new_pos) & (new_pos < end)
        loop_end = tl.minimum(end, new_pos)
        # the split that holds the new token rotates its k and stores k and v (masked loads and
        # stores: no branch, so k and v stay defined for after the loop, where it attends to them)
        at_new = offs_d * 0 + new_pos
        new_mask = d_mask & (at_new >= start) & (at_new < end)                  # holds_new, per lane
        kn_row = KNew + b64 * stride_knt + kv_head * stride_knh
        k_new = tl.load(kn_row + offs_d, mask=new_mask, other=0.0)
        k_p = tl.load(kn_row + partner, mask=new_mask, other=0.0)
        # as the pool holds them (rounded, saturated into fp8), so this step reads what later ones will
        k_new = to_pool(_rotate(k_new, k_p, cos, sin), KBuf.dtype.element_ty, STORE_LIMIT)
        v_new = to_pool(tl.load(VNew + b64 * stride_vnt + kv_head * stride_vnh + offs_d, mask=new_mask,
                                other=0.0), VBuf.dtype.element_ty, STORE_LIMIT)
        new_slot = tl.load(OutLoc + b).to(tl.int64)
        tl.store(KBuf + new_slot * stride_buf_t + kv_head * stride_buf_h + offs_d, k_new, mask=new_mask)
        tl.store(VBuf + new_slot * stride_buf_t + kv_head * stride_buf_h + offs_d, v_new, mask=new_mask)

    for n0 in range(start, loop_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < loop_end
        slot = tl.load(ReqToToken + row * stride_r2t + pos, mask=p_mask, other=0).to(tl.int64)
        kv_offs = slot[:, None] * stride_buf_t + kv_head * stride_buf_h + offs_d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(KBuf + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)     # [BLOCK_N, BLOCK_D]
        s = mma(q, tl.trans(k), FP32_DOT) * qk_scale                          # [BLOCK_H, BLOCK_N]
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VBuf + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v, FP32_DOT)
        m_i = m_new
    if ROTARY:
        if holds_new:
            # the new token last, as it would come in the last block: its weight rounded to q's
            # dtype for the product with v, as mma's operand is
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale   # [BLOCK_H]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            p_v = p_new.to(q.dtype).to(tl.float32)
            acc = acc * alpha[:, None] + p_v[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if DIRECT:  # one split: the output itself, no stage 2
        tl.store(Out + b64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=q_mask)
    else:
        # splits past the request's end write nothing and are skipped in stage 2
        row_mask = h_mask & ((offs_h * 0 + start) < end)
        po = PartialO + b * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s + offs_d[None, :]
        tl.store(po, acc / l_safe[:, None], mask=row_mask[:, None] & d_mask[None, :])
        pl = PartialLse + b * stride_pl_b + heads * stride_pl_h + split
        tl.store(pl, m_i + tl.log2(l_safe), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
        PartialO, PartialLse, Out, SeqLens, num_splits_cap, window,
        stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
        MAX_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    splits = tl.arange(0, MAX_SPLITS)
    start, end = _split_range(seq_len, window, splits, num_splits_cap, MIN_SPLIT, BLOCK_N)
    s_mask = (splits < num_splits_cap) & (start < end)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + b * stride_pl_b + head * stride_pl_h + splits, mask=s_mask,
                  other=float("-inf"))                                          # [MAX_SPLITS]
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(s_mask, w, 0.0)
    o = tl.load(PartialO + b * stride_po_b + head * stride_po_h + splits[:, None] * stride_po_s
                + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [MAX_SPLITS, BLOCK_D]
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(Out + b.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(Out.dtype.element_ty), mask=d_mask)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     partial_o: torch.Tensor, partial_lse: torch.Tensor, scaling: float, *,
                     num_splits: int, min_split_tokens: int, block_n: int, num_warps: int,
                     num_stages: int, fp32_dot: bool, pdl: bool = False,
                     rotary: Optional[tuple[torch.Tensor, ...]] = None,
                     sliding_window: Optional[int] = None) -> None:
    """q, out: [B, Hq, D]; k_buf, v_buf: [capacity, Hkv, D]; req_to_token: [max_reqs, max_ctx];
    req_pool_indices, seq_lens: [B]; partial_o: [B, Hq, num_splits, D] fp32 and partial_lse:
    [B, Hq, num_splits] fp32 scratch. Writes out.

    rotary = (cos, sin, k, v, out_cache_loc): q and the new tokens' k [B, Hkv, D] are not rotated
    yet (cos, sin: [B, 1, D / 2], neox style) and the new k, v are not in the pool yet; the kernel
    rotates both and writes k, v at out_cache_loc [B]. sliding_window W: each new token attends
    to its request's last W positions only (itself included); None: to all of them."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    if batch == 0:
        return
    group = num_q_heads // num_kv_heads
    block_d = next_pow2(head_dim)
    max_splits = max(2, next_pow2(num_splits))
    min_split = max(block_n, min_split_tokens)
    qk_scale = scaling * LOG2E
    direct = num_splits == 1
    window = window_arg(sliding_window)
    if rotary is not None:
        cos, sin, k_new, v_new, out_loc = rotary
        if head_dim % 2 or cos.shape[-1] != head_dim // 2 or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
            raise ValueError("decode rotary: cos/sin must be [B, 1, D / 2] and k, v unit-stride in D")
        rot_args = (cos, sin, k_new, v_new, out_loc)
        rot_strides = (cos.stride(0), sin.stride(0), k_new.stride(0), k_new.stride(1), v_new.stride(0),
                       v_new.stride(1))
    else:
        rot_args, rot_strides = (q, q, q, q, seq_lens), (0,) * 6
    _decode_partial_kernel[(batch, num_kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, partial_o, partial_lse, out,
        *rot_args, qk_scale, num_splits, window,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        partial_o.stride(0), partial_o.stride(1), partial_o.stride(2), partial_lse.stride(0),
        partial_lse.stride(1), out.stride(0), out.stride(1), *rot_strides,
        GROUP=group, HEAD_DIM=head_dim, MIN_SPLIT=min_split, BLOCK_H=max(16, next_pow2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, FP32_DOT=fp32_dot, DIRECT=direct, ROTARY=rotary is not None,
        STORE_LIMIT=kv_limit(k_buf.dtype), num_warps=num_warps, num_stages=num_stages, **pdl_launch(pdl))
    if direct:
        return
    _decode_reduce_kernel[(batch, num_q_heads)](
        partial_o, partial_lse, out, seq_lens, num_splits, window,
        partial_o.stride(0), partial_o.stride(1), partial_o.stride(2), partial_lse.stride(0),
        partial_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, MIN_SPLIT=min_split, BLOCK_N=block_n, MAX_SPLITS=max_splits,
        BLOCK_D=block_d, num_warps=4 if block_d * max_splits >= 2048 else 2, **pdl_launch(pdl))


def splits_for_batch(batch_size: int, num_kv_heads: int, cfg: KernelConfig) -> int:
    """How many sequence splits to launch: enough programs for about two per compute unit, and at
    least ``cfg.balance_splits`` while the grid has at most ``cfg.balance_programs_per_unit``
    programs per unit. A power of two, at most ``cfg.max_kv_splits``."""
    programs = batch_size * num_kv_heads
    wanted = math.ceil(2 * cfg.num_compute_units / max(1, programs))
    if programs <= cfg.balance_programs_per_unit * cfg.num_compute_units:
        wanted = max(wanted, cfg.balance_splits)
    return max(1, min(cfg.max_kv_splits, next_pow2(wanted)))
