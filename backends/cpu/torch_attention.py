"""Paged attention in plain torch: the CPU backend and the portable reference on every platform.

K/V are gathered from the pool through ``req_to_token`` (so any page size works) and fed to
``scaled_dot_product_attention``, in fp32 for fp16/bf16 inputs. Decode is one padded, masked
call for the whole batch. Extend is one call when all requests have the same new and cached
lengths, else one call per request: with mixed lengths, padding to the longest costs 2-8x
more than the per-request calls (measured on the CPU with Qwen2-0.5B shapes). An fp8 pool's
gathered K/V are converted to q's dtype through a 256-entry table. A layer with a sliding window
gathers only the positions its new tokens can see, and masks the rest within them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine.runner.forward_batch import ForwardBatch
from hal.attention import AttentionBackend


@dataclass
class _Segment:
    """One SDPA call: packed tokens [start, end) = ``num_reqs`` requests of ``q_len`` tokens each."""
    start: int
    end: int
    num_reqs: int
    q_len: int
    kv_slots: torch.Tensor           # [num_reqs * kv_len] int64 KV slots (padding -> slot 0)
    mask: Optional[torch.Tensor]     # [num_reqs or 1, 1, q_len, kv_len] bool, True = attend
    causal: bool = False             # top-left causal, no prefix (instead of a mask)


@functools.lru_cache(maxsize=None)
def _fp8_table(fp8: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256] every value of the 8-bit float ``fp8`` in ``dtype``, indexed by its bits."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(fp8).to(dtype)


def from_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (an 8-bit float) in ``dtype``, exactly as ``x.to(dtype)``; a table lookup, since torch's
    own conversion is ~3x slower on the CPU (2.3 against 0.8 ms for 1.1M values, bf16)."""
    table = _fp8_table(x.dtype, dtype, x.device)
    return table.index_select(0, x.view(torch.uint8).reshape(-1).int()).view(x.shape)


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._batch: Optional[ForwardBatch] = None
        # this step's SDPA calls, per sliding window (None: full attention), built when a layer
        # with that window first asks
        self._segments: dict[Optional[int], list[_Segment]] = {}

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._batch = batch
        self._segments = {}

    def _segments_for(self, window: Optional[int]) -> list[_Segment]:
        segments = self._segments.get(window)
        if segments is None:
            batch = self._batch
            build = self._extend_segments if batch.mode.is_extend else self._decode_segments
            segments = self._segments[window] = build(batch, window)
        return segments

    def _slots(self, batch: ForwardBatch, kv_len: int,
               first: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, kv_len] int64 slots of each request's positions first[b] + j (first: [B], default 0;
        padding -> slot 0), and their validity (position < seq_len)."""
        pos = torch.arange(kv_len, device=self.device)[None, :]                    # [1 or B, kv_len]
        if first is not None:
            pos = pos + first[:, None]
        valid = pos < batch.seq_lens[:, None]
        rows = self.req_to_token.index_select(0, batch.req_pool_indices)
        slots = rows[:, :kv_len] if first is None else rows.gather(1, torch.where(valid, pos, 0))
        return torch.where(valid, slots, 0).long(), valid

    def _decode_segments(self, batch: ForwardBatch, window: Optional[int]) -> list[_Segment]:
        """With a window W, request b reads only its last min(seq_len, W) positions."""
        lens = batch.seq_lens_cpu
        seen = [min(n, window) for n in lens] if window else lens              # keys each request attends
        first = (batch.seq_lens - window).clamp(min=0) if window and max(lens) > window else None
        slots, valid = self._slots(batch, max(seen), first)
        mask = None if min(seen) == max(seen) else valid[:, None, None, :]
        return [_Segment(0, len(lens), len(lens), 1, slots.view(-1), mask)]

    def _extend_mask(self, prefix: int, q_len: int, first: int, window: Optional[int]) -> torch.Tensor:
        """[1, 1, q_len, prefix + q_len - first]: new token i (position prefix + i) sees the
        positions first + j with prefix + i - window < first + j <= prefix + i."""
        q_pos = prefix + torch.arange(q_len, device=self.device)[:, None]
        k_pos = first + torch.arange(prefix + q_len - first, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask[None, None]

    def _extend_segments(self, batch: ForwardBatch, window: Optional[int]) -> list[_Segment]:
        prefix, ext, seq = batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu, batch.seq_lens_cpu
        slots, _ = self._slots(batch, max(seq))

        def segment(start: int, reqs: slice, p: int, n: int) -> _Segment:
            num = reqs.stop - reqs.start
            if window is None or p + n <= window:     # the window holds every position: causal
                kv = slots[reqs, : p + n].reshape(-1)
                mask = self._extend_mask(p, n, 0, None) if p and n > 1 else None
                return _Segment(start, start + num * n, num, n, kv, mask, causal=p == 0 and n > 1)
            first = max(0, p - window + 1)            # the first position any new token sees
            kv = slots[reqs, first: p + n].reshape(-1)
            mask = self._extend_mask(p, n, first, window) if n > 1 else None
            return _Segment(start, start + num * n, num, n, kv, mask)

        if len(set(prefix)) == 1 and len(set(ext)) == 1:
            return [segment(0, slice(0, len(ext)), prefix[0], ext[0])]
        segments, start = [], 0
        for i, (p, n) in enumerate(zip(prefix, ext)):
            segments.append(segment(start, slice(i, i + 1), p, n))
            start += n
        return segments

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scaling: float,
                batch: ForwardBatch, *, sliding_window: Optional[int] = None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        outs = [self._attend(q, k_buf, v_buf, s, scaling) for s in self._segments_for(sliding_window)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def _attend(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, s: _Segment,
                scaling: float) -> torch.Tensor:
        hq, hkv, d = q.shape[1], k_buf.shape[1], q.shape[2]
        # index_select, not k_buf[slots]: on the CPU advanced indexing is many times slower
        ks = k_buf.index_select(0, s.kv_slots).view(s.num_reqs, -1, hkv, d)   # [b, kv_len, Hkv, D]
        vs = v_buf.index_select(0, s.kv_slots).view(s.num_reqs, -1, hkv, d)
        if ks.dtype != q.dtype:   # an fp8 pool
            ks, vs = from_fp8(ks, q.dtype), from_fp8(vs, q.dtype)
        if s.q_len == 1 and hq != hkv:
            # Decode with GQA: the q heads of one KV head form a query "sequence" of length
            # hq / hkv, so SDPA never expands K and V to every q head, and runs in the model's
            # dtype (its CPU kernel accumulates in fp32). Measured at batch 64, Qwen2.5-0.5B
            # shapes, bf16: 5.0 ms per layer, against 11.5 ms for fp32 SDPA with enable_gqa.
            qs = q[s.start:s.end].reshape(s.num_reqs, hkv, hq // hkv, d)
            out = F.scaled_dot_product_attention(qs, ks.transpose(1, 2), vs.transpose(1, 2),
                                                 attn_mask=s.mask, scale=scaling)   # [b, Hkv, G, D]
            return out.reshape(s.end - s.start, hq, d)
        qs = q[s.start:s.end].reshape(s.num_reqs, s.q_len, hq, d)
        if qs.dtype != torch.float32:
            # torch's CPU flash kernel is ~4x slower in bf16 than in fp32 for decode (measured:
            # 8.2 vs 2.3 ms per layer at batch 64, Qwen2.5-0.5B shapes)
            qs, ks, vs = qs.float(), ks.float(), vs.float()
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=s.mask,
            is_causal=s.causal, scale=scaling, enable_gqa=hq != hkv)              # [b, Hq, q_len, D]
        return out.transpose(1, 2).reshape(s.end - s.start, hq, d).to(q.dtype)
