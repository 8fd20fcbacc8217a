"""AiterAttentionBackend: the HAL attention role on AMD's aiter kernels (github.com/ROCm/aiter).

Written against aiter's Python API as of ROCm/aiter main, 2025-26 (PyPI ``amd-aiter`` 0.1.x); it
has never run on AMD hardware. Two functions are used, both called by keyword:

- decode: ``aiter.paged_attention_ragged`` (aiter/ops/attention.py, csrc/cpp_itfs/pa/pa_ragged.py),
  the split-K paged decode kernel. It reads a CSR page table (``kv_indptr``, ``kv_page_indices``,
  ``kv_last_page_lens``: int32, as FlashInfer's) and, with ``kv_cache_layout="NHD"``, a cache of
  ``[num_pages, page_size, Hkv, D]``, which is our pool ``[num_pages * page_size, Hkv, D]`` as it
  is. Its scratch (``workspace_buffer``) holds, per request, head and 256-token partition, one
  partial output of D values in the model dtype and two fp32 softmax statistics.
- extend: ``aiter.mha_batch_prefill_func`` (aiter/ops/mha.py), CK's varlen prefill over a paged
  cache with a bottom-right causal mask (query i of a request with p cached tokens sees keys
  0 .. p + i). We pass the pool as its 3-D, page-size-1 layout ``[slots, Hkv, D]`` with one index
  per cached token, so any ``--page-size`` works without a gather.

Both page tables are built each step on the device from ``req_to_token`` (a request's position i
sits at offset i % page_size of its page: engine/mem_cache/kv_pool.py); the host lengths give only
sizes. New K/V go into the pool with ``KVPool.set_kv``.

What runs on the Triton backend instead (backends/triton), chosen once at construction and logged:
- everything, for dtypes other than float16/bfloat16 (aiter's kernels have no fp32 path);
- extend, for head_dim not a multiple of 8 or above 256 (CK's limits);
- decode, for head_dim other than 64/128, more than 16 query heads per KV head, or page sizes
  other than 1, 16, 32 (what aiter's own paged-attention tests cover);
- decode once ``reserve`` is called, i.e. when decode steps are captured in device graphs. The
  aiter kernel's partition count is baked into a captured launch, so a graph would need it for the
  whole context length, and its scratch with it: 512 captured rows x 32 heads x 512 partitions
  (128K context) x 264 bytes is 2.2 GB. Triton's decode bounds its splits instead; eager decode
  (``--disable-cuda-graph``) stays on aiter.

Sliding windows: neither kernel is called with one, so this backend does not register the
"sliding_window" feature; a model with sliding-window layers selects Triton on ROCm (or is a clear
error with ``--attention-backend aiter``), and constructing this backend for one raises.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F

from backends.rocm import aiter_import
from engine.runner.forward_batch import ForwardBatch
from hal.attention import AttentionBackend, page_indices

logger = logging.getLogger(__name__)

REQUIRED_FUNCTIONS = ("paged_attention_ragged", "mha_batch_prefill_func")
USER = "--attention-backend aiter"
INSTEAD = "use --attention-backend triton"
PARTITION_SIZE = 256                       # tokens per split of aiter's decode kernel (fixed in it)
DTYPES = (torch.float16, torch.bfloat16)
DECODE_HEAD_DIMS = (64, 128)
DECODE_PAGE_SIZES = (1, 16, 32)
MAX_DECODE_GROUP = 16                      # query heads per KV head in one pass of the decode kernel
MAX_EXTEND_HEAD_DIM = 256


def import_aiter() -> Any:
    """The aiter module, or a clear error when it cannot be imported or lacks what we call."""
    return aiter_import.import_aiter(USER, REQUIRED_FUNCTIONS, INSTEAD)


@functools.lru_cache(maxsize=1)
def aiter_importable() -> bool:
    """Whether aiter imports and offers the functions we call (checked once, when selecting)."""
    return aiter_import.usable(USER, REQUIRED_FUNCTIONS, INSTEAD)


def triton_fallback(**kw) -> AttentionBackend:
    """The backend for what aiter does not run (see the module docstring)."""
    from backends.triton.attention_backend import TritonAttentionBackend

    return TritonAttentionBackend(**kw)


class AiterAttentionBackend(AttentionBackend):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if any(w is not None for w in self.sliding_windows):
            raise ValueError(f"{USER} does not run sliding-window layers (windows {self.sliding_windows}); {INSTEAD}")
        self._kw = kw
        self._aiter = import_aiter()
        self._fallback: Optional[AttentionBackend] = None
        self.extend_fallback_reason = self._extend_unsupported()
        self.decode_fallback_reason = self._decode_unsupported()
        self._on_triton = False          # this step runs on the fallback
        self._meta: dict[str, Any] = {}  # this step's aiter arguments
        # [1] fp32: the kernels' K/V dequantization scales, 1 for a bf16/fp16 cache
        self._kv_scale = torch.ones(1, dtype=torch.float32, device=self.device)
        self._workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        logger.info("aiter attention (aiter %s): extend on %s, decode on %s",
                    getattr(self._aiter, "__version__", "version unknown"),
                    _where(self.extend_fallback_reason), _where(self.decode_fallback_reason))

    # -- what aiter runs -------------------------------------------------------------------------
    def _extend_unsupported(self) -> Optional[str]:
        if self.dtype not in DTYPES:
            return f"aiter runs float16/bfloat16, not {str(self.dtype).replace('torch.', '')}"
        if self.head_dim % 8 or self.head_dim > MAX_EXTEND_HEAD_DIM:
            return f"aiter's prefill needs head_dim a multiple of 8 up to 256, not {self.head_dim}"
        return None

    def _decode_unsupported(self) -> Optional[str]:
        group = self.num_q_heads // self.num_kv_heads
        if self.dtype not in DTYPES:
            return f"aiter runs float16/bfloat16, not {str(self.dtype).replace('torch.', '')}"
        if self.head_dim not in DECODE_HEAD_DIMS:
            return f"aiter's paged decode is used for head_dim {DECODE_HEAD_DIMS}, not {self.head_dim}"
        if group > MAX_DECODE_GROUP:
            return f"aiter's paged decode takes up to {MAX_DECODE_GROUP} query heads per KV head, not {group}"
        if self.page_size not in DECODE_PAGE_SIZES:
            return f"aiter's paged decode is used for page sizes {DECODE_PAGE_SIZES}, not {self.page_size}"
        return None

    def fallback(self) -> AttentionBackend:
        if self._fallback is None:
            self._fallback = triton_fallback(**self._kw)
        return self._fallback

    def reserve(self, max_batch_size: int) -> None:
        """Decode steps are about to be captured in device graphs: from now on decode runs on the
        Triton kernel (module docstring), whose scratch is allocated here for every batch size."""
        if self.decode_fallback_reason is None:
            self.decode_fallback_reason = "decode steps are captured in device graphs"
            logger.info("aiter attention: decode on triton from now on (%s)", self.decode_fallback_reason)
        self.fallback().reserve(max_batch_size)

    # -- metadata ------------------------------------------------------------------------------
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        reason = self.decode_fallback_reason if batch.mode.is_decode else self.extend_fallback_reason
        self._on_triton = reason is not None
        if self._on_triton:
            self.fallback().init_forward_metadata(batch)
        elif batch.mode.is_decode:
            self._meta = self._decode_metadata(batch)
        else:
            self._meta = self._extend_metadata(batch)

    def _decode_metadata(self, batch: ForwardBatch) -> dict[str, Any]:
        ps, lens = self.page_size, batch.seq_lens
        pages = (lens + ps - 1) // ps                                               # [B]
        total_pages = sum(-(-n // ps) for n in batch.seq_lens_cpu)
        partitions = -(-max(batch.seq_lens_cpu) // PARTITION_SIZE)
        self._grow_workspace(batch.batch_size * self.num_q_heads * partitions)
        return dict(kv_indptr=_indptr(pages),
                    kv_page_indices=page_indices(self.req_to_token, batch.req_pool_indices, lens,
                                                 total_pages, ps),
                    kv_last_page_lens=(lens - (pages - 1) * ps).to(torch.int32),
                    max_num_partitions=partitions)

    def _grow_workspace(self, rows: int) -> None:
        """rows = batch * heads * partitions, each a partial output [D] and two fp32 statistics."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        need = rows * (self.head_dim * elem + 2 * 4)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8, device=self.device)

    def _extend_metadata(self, batch: ForwardBatch) -> dict[str, Any]:
        lens = batch.seq_lens
        return dict(cu_seqlens_q=_indptr(batch.extend_seq_lens), kv_indptr=_indptr(lens),
                    # one "page" per cached token: the pool as aiter's page-size-1 layout
                    kv_page_indices=page_indices(self.req_to_token, batch.req_pool_indices, lens,
                                                 sum(batch.seq_lens_cpu), 1),
                    max_seqlen_q=max(batch.extend_seq_lens_cpu), max_seqlen_k=max(batch.seq_lens_cpu))

    # -- per layer -----------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scaling: float,
                batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        if self._on_triton:
            return self.fallback().forward(q, k, v, layer_id, scaling, batch)
        self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        if q.stride(2) != 1 or q.stride(1) != self.head_dim:   # the kernels step heads by D
            q = q.contiguous()
        m = self._meta
        if batch.mode.is_decode:
            pages = (-1, self.page_size, self.num_kv_heads, self.head_dim)             # NHD
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self._aiter.paged_attention_ragged(
                out=out, workspace_buffer=self._workspace, query=q, key_cache=k_buf.view(pages),
                value_cache=v_buf.view(pages), scale=scaling, kv_indptr=m["kv_indptr"],
                kv_page_indices=m["kv_page_indices"], kv_last_page_lens=m["kv_last_page_lens"],
                block_size=self.page_size, max_num_partitions=m["max_num_partitions"], alibi_slopes=None,
                kv_cache_dtype="auto", kv_cache_layout="NHD", logits_soft_cap=0.0, k_scale=self._kv_scale,
                v_scale=self._kv_scale, fp8_out_scale=None, partition_size=PARTITION_SIZE)
            return out
        return self._aiter.mha_batch_prefill_func(
            q, k_buf, v_buf, m["cu_seqlens_q"], m["kv_indptr"], m["kv_page_indices"], m["max_seqlen_q"],
            m["max_seqlen_k"], softmax_scale=scaling, causal=True)


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    """[n + 1] int32 exclusive prefix sums of counts [n], where counts live."""
    return F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))


def _where(fallback_reason: Optional[str]) -> str:
    return "aiter" if fallback_reason is None else f"triton ({fallback_reason})"
