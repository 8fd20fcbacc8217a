"""TritonAttentionBackend: the HAL attention role on the portable Triton kernels.

``init_forward_metadata`` does the per-step host work once (grid sizes from host lists, the
packed offsets of each request's new tokens); ``forward`` only launches kernels, with no host
sync. Decode scratch buffers are allocated once and grow only when a larger batch arrives, so a
graph runner that calls ``reserve(max_batch_size)`` first can capture decode steps.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from backends.triton.decode_attention import decode_attention, splits_for_batch
from backends.triton.extend_attention import extend_attention
from backends.triton.kv_store import store_kv
from backends.triton.tl_helpers import fp32_dot
from engine.runner.forward_batch import ForwardBatch
from hal.attention import AttentionBackend
from hal.kernel_config import KernelConfig
from hal.platform import platform_for_device

logger = logging.getLogger(__name__)


class TritonAttentionBackend(AttentionBackend):
    def __init__(self, *, kernel_config: Optional[KernelConfig] = None, **kw) -> None:
        super().__init__(**kw)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        cfg = kernel_config or platform_for_device(torch.device(self.device)).kernel_config()
        self.config = cfg
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.extend_block_m, self.extend_block_n, self.extend_stages = cfg.extend_tiles(self.head_dim, elem)
        kv_elem = torch.empty((), dtype=self.kv_pool.dtype).element_size()
        self.decode_block_n, self.decode_stages = cfg.decode_tiles(self.head_dim, kv_elem)
        self.fp32_dot = fp32_dot(self.dtype)
        # decode scratch: [capacity] fp32, viewed per step as [B, Hq, splits, D] and [B, Hq, splits]
        self._partial_o = torch.empty(0, dtype=torch.float32, device=self.device)
        self._partial_lse = torch.empty(0, dtype=torch.float32, device=self.device)
        self._num_splits = 1
        self._max_extend_len = 0
        # per extend step: the extend kernel's per-request tensors (the prompts only, in a mixed
        # step), and the decoding requests' (req_pool_indices, seq_lens) of a mixed step
        self._extend_args: tuple[torch.Tensor, ...] = ()
        self._mixed_args: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        logger.debug("triton attention: extend tiles %dx%d (%d stages), decode block %d, up to %d splits",
                     self.extend_block_m, self.extend_block_n, self.extend_stages, self.decode_block_n,
                     cfg.max_kv_splits)

    # -- metadata ------------------------------------------------------------------------------
    def splits_for(self, batch_size: int) -> int:
        cfg = self.config
        return splits_for_batch(batch_size, self.num_kv_heads, cfg)

    def reserve(self, max_batch_size: int) -> None:
        """Allocate the decode scratch for every batch size up to ``max_batch_size`` now."""
        need = max(b * self.splits_for(b) for b in range(1, max_batch_size + 1))
        self._grow(need)

    def _grow(self, rows: int) -> None:
        """rows = batch_size * splits."""
        need = rows * self.num_q_heads
        if self._partial_lse.numel() < need:
            self._partial_o = torch.empty(need * self.head_dim, dtype=torch.float32, device=self.device)
            self._partial_lse = torch.empty(need, dtype=torch.float32, device=self.device)

    def fuses_rotary(self, batch: ForwardBatch) -> bool:
        """Decode steps rotate q and k inside the attention kernel, which also stores k and v."""
        return batch.mode.is_decode and bool(self.config.decode_fused_rotary)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        decodes = batch.batch_size if batch.mode.is_decode else batch.mixed_decodes
        if decodes:
            self._num_splits = self.splits_for(decodes)
            self._grow(decodes * self._num_splits)
        if batch.mode.is_decode:
            return
        ext = batch.extend_seq_lens
        starts = torch.cumsum(ext, 0) - ext                           # [B] offset of each request in q
        n = batch.batch_size - decodes
        lens = batch.extend_seq_lens_cpu[:n]
        self._max_extend_len = max(lens) if lens else 0
        args = (batch.req_pool_indices, batch.extend_prefix_lens, ext, starts)
        self._extend_args = tuple(a[:n] for a in args) if decodes else args
        self._mixed_args = (batch.req_pool_indices[n:], batch.seq_lens[n:]) if decodes else None

    # -- per layer -----------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scaling: float,
                batch: ForwardBatch, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None, *,
                sliding_window: Optional[int] = None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]. With cos_sin (decode, see fuses_rotary)
        q and k are not rotated yet. sliding_window: the layer's (a kernel argument, so a captured
        step replays it as it is)."""
        cfg = self.config
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        if q.stride(-1) != 1:
            q = q.contiguous()
        rotary = None
        if cos_sin is not None:
            if not batch.mode.is_decode:
                raise ValueError("the Triton backend rotates q and k itself only in decode steps")
            k = k if k.stride(-1) == 1 else k.contiguous()
            v = v if v.stride(-1) == 1 else v.contiguous()
            rotary = (*(c if c.stride(-1) == 1 else c.contiguous() for c in cos_sin), k, v, batch.out_cache_loc)
        else:
            store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, num_warps=cfg.elementwise_num_warps,
                     pdl=bool(cfg.pdl))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)    # [T, Hq, D]
        if batch.mode.is_decode:
            self._decode(q, k_buf, v_buf, out, batch.req_pool_indices, batch.seq_lens, scaling, rotary,
                         sliding_window)
            return out
        # A mixed step's decoding requests (the last ones, a token each) take the decode kernel:
        # the extend kernel would read their whole context once per q head, and its grid spans
        # the longest prompt's blocks for every request.
        extend_attention(q, k_buf, v_buf, out, self.req_to_token, *self._extend_args, self._max_extend_len,
                         scaling, block_m=self.extend_block_m, block_n=self.extend_block_n,
                         num_warps=cfg.extend_num_warps, num_stages=self.extend_stages, fp32_dot=self.fp32_dot,
                         sliding_window=sliding_window)
        if self._mixed_args is not None:
            t = q.shape[0] - batch.mixed_decodes
            self._decode(q[t:], k_buf, v_buf, out[t:], *self._mixed_args, scaling, sliding_window=sliding_window)
        return out

    def _decode(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, scaling: float,
                rotary: Optional[tuple] = None, sliding_window: Optional[int] = None) -> None:
        cfg = self.config
        b, s = q.shape[0], self._num_splits
        partial_o = self._partial_o[: b * self.num_q_heads * s * self.head_dim].view(
            b, self.num_q_heads, s, self.head_dim)
        partial_lse = self._partial_lse[: b * self.num_q_heads * s].view(b, self.num_q_heads, s)
        decode_attention(q, k_buf, v_buf, out, self.req_to_token, req_pool_indices, seq_lens, partial_o,
                         partial_lse, scaling, num_splits=s, min_split_tokens=cfg.min_split_tokens,
                         block_n=self.decode_block_n, num_warps=cfg.decode_num_warps,
                         num_stages=self.decode_stages, fp32_dot=self.fp32_dot, pdl=bool(cfg.pdl),
                         rotary=rotary, sliding_window=sliding_window)
