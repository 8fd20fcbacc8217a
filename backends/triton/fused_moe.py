"""The mixture-of-experts MLP as grouped GEMMs over routed tokens, with a fixed launch shape.

Each token's k (token, slot) pairs are grouped by expert on the device (``align_pairs``: one
Triton program for decode batches, torch ops for larger ones; output shapes that depend on T, k
and E only, no read back to the host), each expert's group padded to whole blocks of BLOCK_M rows
(the worst case: T * k + min(E, T * k) * (BLOCK_M - 1) rows, rounded up). One kernel then runs a grid of the worst-case block
count for this T: a program takes one block (one expert) and BLOCK_N output features, and a block
past the used ones returns at once. So a decode step with MoE layers can be captured in a device
graph and replayed with any routing.

    h[p] = silu_and_mul(x[p // k] @ w13[e].T)   the first pass, SiLU-and-mul in its epilogue
    y[p] = h[p] @ w2[e].T                        the second pass
    out[t] = sum_j topk_weights[t, j] * y[t * k + j]      _moe_sum_kernel, in float32

with p = t * k + j and e = topk_ids[t, j]; each product is rounded to x's dtype where the
reference (hal/layer_ops.py ``LayerOps.fused_moe``) rounds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from backends.triton.tl_helpers import fit_stages, fp32_dot, mma, next_pow2


@dataclass
class AlignedPairs:
    """The (token, slot) pairs grouped by expert, each group starting at a multiple of block_m;
    every tensor's shape depends on (T, k, E, block_m) only."""
    sorted_pairs: torch.Tensor   # [num_blocks * block_m] int32: pair index t * k + j; T * k = padding
    block_expert: torch.Tensor   # [num_blocks] int32: each block's expert; -1 past the used blocks
    num_used: torch.Tensor       # [1] int32: blocks that hold pairs (they come first)
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most blocks ``num_pairs`` pairs can fill: at most min(E, pairs) experts get any, and each
    of those pads its group by at most block_m - 1 rows."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)


# up to this many pairs (decode batches) one Triton program aligns them (_align_kernel): one launch
# where the torch ops take some twenty, each a few microseconds in a graph. Its loops grow with the
# pairs, so extend batches take the torch ops (a guess: no GPU has timed either yet)
ALIGN_KERNEL_MAX_PAIRS = 1024
ALIGN_BLOCK_P = 64          # pairs of a chunk: its [chunk, E] and [chunk, chunk] comparisons stay small


@triton.jit
def _align_kernel(TopkIds, SortedPairs, BlockExpert, NumUsed, num_pairs, num_experts, num_blocks,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: align_pairs for a few pairs, SortedPairs filled with num_pairs beforehand. Pass
    one counts each expert's pairs; pass two writes each pair at its group's first row plus the
    pairs of its expert before it (earlier chunks: ``seen``; its own chunk: a [BLOCK_P, BLOCK_P]
    comparison), so a group keeps token order, as the stable sort of the torch path does."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids = tl.load(TopkIds + p0 + offs_p, mask=p0 + offs_p < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)                                            # [BLOCK_E]
    seen = (block_end - blocks) * BLOCK_M                                       # next free row of each group
    earlier = offs_p[None, :] < offs_p[:, None]                                 # [BLOCK_P, BLOCK_P]: q < p
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + offs_p
        ids = tl.load(TopkIds + pairs, mask=pairs < num_pairs, other=-1)
        hit = (ids[:, None] == offs_e[None, :]).to(tl.int32)                    # [BLOCK_P, BLOCK_E]
        rank = tl.sum(((ids[:, None] == ids[None, :]) & earlier).to(tl.int32), 1)
        row = tl.sum(hit * seen[None, :], 1) + rank
        tl.store(SortedPairs + row, pairs.to(tl.int32), mask=(pairs < num_pairs) & (ids >= 0) & (ids < num_experts))
        seen += tl.sum(hit, 0)
    tl.store(NumUsed, tl.sum(blocks, 0))
    for b0 in range(0, num_blocks, BLOCK_P):
        b = b0 + offs_p
        # lanes past the experts hold no blocks: their block_end is the used count, never <= b below it
        e = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), 1)
        tl.store(BlockExpert + b, tl.where(e < num_experts, e, -1), mask=b < num_blocks)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                use_kernel: Optional[bool] = None) -> AlignedPairs:
    """topk_ids [T, k] (any integer type, values in [0, E)) -> the pairs sorted by expert (stable:
    a group keeps its pairs in token order) and padded to whole blocks of ``block_m``. Device ops
    only, of fixed output shapes (no .item(), nonzero or masked indexing), so it can be captured
    in a device graph: one Triton program for at most ALIGN_KERNEL_MAX_PAIRS pairs (or as
    ``use_kernel`` says), torch ops otherwise."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    num_blocks = max_blocks(num_pairs, num_experts, block_m)
    if use_kernel if use_kernel is not None else num_pairs <= ALIGN_KERNEL_MAX_PAIRS:
        ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
        sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
        block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
        num_used = torch.empty(1, dtype=torch.int32, device=device)
        _align_kernel[(1,)](ids, sorted_pairs, block_expert, num_used, num_pairs, num_experts, num_blocks,
                            BLOCK_M=block_m, BLOCK_P=ALIGN_BLOCK_P, BLOCK_E=max(16, next_pow2(num_experts)),
                            num_warps=4)
        return AlignedPairs(sorted_pairs, block_expert, num_used, block_m)
    flat = topk_ids.reshape(-1).long()                                         # [P]
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))                        # [E] (bincount's size is the max id)
    group_end = torch.cumsum(counts, 0)                                        # [E] in the sorted pairs
    blocks = (counts + block_m - 1) // block_m                                 # [E]
    block_end = torch.cumsum(blocks, 0)                                        # [E] in blocks
    order = torch.argsort(flat, stable=True)                                   # [P] pairs by expert
    expert = flat[order]
    # a pair's row: where its expert's blocks start, plus its rank within the expert's group
    row = (block_end - blocks)[expert] * block_m + torch.arange(num_pairs, device=device) - (group_end - counts)[expert]
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, row, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=device), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return AlignedPairs(sorted_pairs, block_expert, block_end[-1:].to(torch.int32), block_m)


@triton.jit
def _moe_gemm_kernel(A, W, Out, SortedPairs, BlockExpert, NumUsed, num_pairs, out_features, in_features, stride_am,
                     stride_we, stride_wn, stride_om, ROWS_PER_A: tl.constexpr, SILU_MUL: tl.constexpr,
                     EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One (block of an expert's pairs, BLOCK_N features): Out[p, n] = sum_k A[p // ROWS_PER_A, k] *
    W[e, n, k], rounded to Out's dtype. SILU_MUL: W[e] is [gate | up] of 2N rows and Out[p, n] =
    silu_and_mul of the two rounded products (rounded as layer_ops.silu_and_mul rounds)."""
    N = out_features
    K = in_features
    pid_m = tl.program_id(0)
    if pid_m >= tl.load(NumUsed):
        return
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))   # [BLOCK_M]
    m_mask = pairs < num_pairs
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = A + (pairs // ROWS_PER_A).to(tl.int64)[:, None] * stride_am
    w_rows = W + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_rows + ks[None, :], mask=m_mask[:, None], other=0.0)              # [BLOCK_M, BLOCK_K]
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None], other=0.0)              # [BLOCK_N, BLOCK_K]
        else:
            a = tl.load(a_rows + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < K)[None, :], other=0.0)
        acc += mma(a, tl.trans(w), FP32_DOT)
        if SILU_MUL:
            if EVEN_K:
                up = tl.load(w_rows + N * stride_wn + ks[None, :], mask=n_mask[:, None], other=0.0)
            else:
                up = tl.load(w_rows + N * stride_wn + ks[None, :], mask=n_mask[:, None] & (ks < K)[None, :],
                             other=0.0)
            acc_up += mma(a, tl.trans(up), FP32_DOT)
    dtype = Out.dtype.element_ty
    if SILU_MUL:
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    out = Out + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_kernel(Y, TopkWeights, Out, hidden, stride_om, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """One (token, BLOCK features): Out[t] = sum_j TopkWeights[t, j] * Y[t * TOP_K + j] in float32,
    the slots in order, rounded once. Y is [T * TOP_K, hidden] contiguous; TopkWeights [T, TOP_K] too."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(TopkWeights + t * TOP_K + j)
        acc += w * tl.load(Y + (t * TOP_K + j) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_om + cols, acc.to(Out.dtype.element_ty), mask=mask)


def choose_block_m(num_pairs: int, num_experts: int, max_block_m: int = 64) -> int:
    """Rows of a block: the mean pairs per expert as a power of two, from 16 (a tensor-core
    MMA's least; decode) up to ``max_block_m`` (extend)."""
    return max(16, min(max_block_m, next_pow2(triton.cdiv(num_pairs, num_experts))))


def gemm_tiles(block_m: int, n: int, k: int, silu_mul: bool, elem_bytes: int, block_n: int, block_k: int,
               num_stages: int, smem_bytes: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_stages) of _moe_gemm_kernel for an [N, K] weight: the tiles no wider
    than the weight, the stages and then block_k cut until a stage's x tile and one W tile (two
    with silu_mul: gate and up) fit ``smem_bytes`` that many times."""
    block_k = min(block_k, max(16, next_pow2(k)))
    block_n = min(block_n, max(16, next_pow2(n)))
    w_tiles = 2 if silu_mul else 1
    stages, block_k = fit_stages(lambda bk: bk * (block_m + w_tiles * block_n) * elem_bytes, num_stages, block_k,
                                 smem_bytes)
    return block_n, block_k, stages


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, aligned: AlignedPairs, num_pairs: int, rows_per_a: int,
                  silu_mul: bool, block_n: int, block_k: int, num_warps: int, num_stages: int,
                  smem_bytes: int) -> torch.Tensor:
    """[num_pairs, N] in a's dtype: each pair's row of ``a`` times its expert's w [E, N (2N with
    silu_mul), K]."""
    n = w.shape[1] // 2 if silu_mul else w.shape[1]
    k = w.shape[2]
    out = torch.empty((num_pairs, n), dtype=a.dtype, device=a.device)
    block_m = aligned.block_m
    block_n, block_k, stages = gemm_tiles(block_m, n, k, silu_mul, a.element_size(), block_n, block_k, num_stages,
                                          smem_bytes)
    _moe_gemm_kernel[(aligned.num_blocks, triton.cdiv(n, block_n))](
        a, w, out, aligned.sorted_pairs, aligned.block_expert, aligned.num_used, num_pairs, n, k, a.stride(0),
        w.stride(0), w.stride(1), out.stride(0), ROWS_PER_A=rows_per_a, SILU_MUL=silu_mul, EVEN_K=k % block_k == 0,
        FP32_DOT=fp32_dot(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages,
        num_warps=num_warps, num_stages=stages)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, block_m: int = 64, block_n: int = 64, block_k: int = 64,
              num_warps: int = 4, num_stages: int = 3, smem_bytes: int = 99 * 1024) -> torch.Tensor:
    """LayerOps.fused_moe's contract (hal/layer_ops.py): x [T, H] (rows at any stride); w13 [E, 2I, H];
    w2 [E, H, I]; topk_weights [T, k]; topk_ids [T, k] of any integer type -> [T, H] in x's dtype.
    Blocks are ``choose_block_m`` rows, at most ``block_m``; each program takes ``block_n``
    features in ``block_k`` chunks, its stages and then block_k cut until they fit in ``smem_bytes``.
    Nothing is read back to the host: every launch and allocation depends on the shapes alone."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{num_tokens}, k]")
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"fused_moe: for x {tuple(x.shape)} the weights must be w13 [E, 2I, {hidden}] and "
                         f"w2 [E, {hidden}, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}")
    if not x.dtype == w13.dtype == w2.dtype:
        raise ValueError(f"fused_moe: x and the expert weights must share a dtype, got {x.dtype}, {w13.dtype} and "
                         f"{w2.dtype}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"fused_moe: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    aligned = align_pairs(topk_ids, num_experts, choose_block_m(num_pairs, num_experts, block_m))
    launch = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                  smem_bytes=smem_bytes)
    h = _grouped_gemm(x, w13, aligned, num_pairs, top_k, True, **launch)       # [T * k, I]
    y = _grouped_gemm(h, w2, aligned, num_pairs, 1, False, **launch)           # [T * k, H]
    weights = topk_weights.float().contiguous()                                # [T, k]
    block = min(1024, next_pow2(hidden))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y, weights, out, hidden, out.stride(0), TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
