"""FlashInferAttentionBackend: the HAL attention role on FlashInfer's paged decode/extend kernels.

FlashInfer reads a paged KV cache through a page table in CSR form: ``kv_indptr`` (each
request's range in ``kv_indices``), ``kv_indices`` (page ids in position order) and
``kv_last_page_len``. Our pool ``[num_pages * page_size, Hkv, D]`` is FlashInfer's NHD layout
``[num_pages, page_size, Hkv, D]`` as it is, and a request's position ``i`` always sits at
offset ``i % page_size`` of its page (engine/mem_cache/kv_pool.py), so request r's j-th page is
``req_to_token[r, j * page_size] // page_size``. Each step builds the page ids on the device
from ``req_to_token`` with torch ops (no host sync: the host lengths give every size), and the
indptr and last-page lengths on the host from ``seq_lens_cpu``, which FlashInfer's ``plan``
needs there anyway to split the work.

Decode steps are captured in CUDA graphs (FlashInfer's ``use_cuda_graph`` wrappers): one decode
wrapper per captured batch size over fixed page-table buffers, planned with dummy lengths before
its capture and with the real ones before each replay (``prepare_graph_replay``). With
``use_cuda_graph`` FlashInfer's work split depends on the batch size only, so a replay launches
what the capture recorded and reads the new plan from the same buffers. The buffers hold one page
per pool page plus one per padded row; a step whose requests reference more pages than that (a
prefix shared by many requests counts once per request) runs eagerly.

Sliding windows: FlashInfer fixes a window at ``plan`` (``window_left``, and the kernel it compiles
depends on whether there is one), so every wrapper above exists once per window the model's layers
use (``sliding_windows``; None: full attention), all planned each step over the same page table,
and a layer runs the one of its window. ``window_left`` counts the keys left of the query that it
sees (the query at p sees p - window_left .. p), so a window of W keys is ``window_left = W - 1``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.runner.forward_batch import ForwardBatch
from hal.attention import AttentionBackend, page_indices

logger = logging.getLogger(__name__)

# FlashInfer's split-k scratch, shared by all wrappers (they run in stream order). 128 MiB is
# FlashInfer's recommendation; it holds the split-k partials of batch sizes in the hundreds.
WORKSPACE_BYTES = 128 << 20
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# The CUDA-core decode kernel is instantiated for these query heads per KV head; larger or other
# groups use the tensor-core (prefill-kernel) decode, which is also faster there.
CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4)
# Extend kernels: "fa2" (Ampere-style, compiles in a few minutes), "fa3" (Hopper wgmma/TMA, sm90a
# only, longer to compile) or "auto" (FlashInfer picks fa3 on sm90a).
DEFAULT_PREFILL_BACKEND = "fa2"


def import_flashinfer() -> Any:
    """The flashinfer module, or a clear error when it is installed but cannot be imported."""
    try:
        import flashinfer
    except Exception as e:  # ImportError, or a dependency that fails at import time
        raise RuntimeError(f"--attention-backend/--sampling-backend flashinfer: flashinfer-python is "
                           f"installed but failed to import ({type(e).__name__}: {e})") from e
    return flashinfer


@dataclass
class _Wrappers:
    """A decode and an extend wrapper per sliding window (None: full attention); each keeps its own
    pinned host buffer for plan data."""
    decode: dict[Optional[int], Any]
    extend: dict[Optional[int], Any]


def window_left(sliding_window: Optional[int]) -> int:
    """FlashInfer's ``window_left`` for a layer's sliding window W (its query sees the W positions
    p - W < j <= p, i.e. W - 1 left of itself), -1 (no window) for None."""
    return -1 if sliding_window is None else sliding_window - 1


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, *, prefill_backend: str = DEFAULT_PREFILL_BACKEND, **kw) -> None:
        super().__init__(**kw)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"--attention-backend flashinfer runs float16 and bfloat16, not "
                             f"{str(self.dtype).replace('torch.', '')}; pass --dtype bfloat16 or "
                             "--attention-backend triton")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"--attention-backend flashinfer supports head_dim {SUPPORTED_HEAD_DIMS}, "
                             f"this model has {self.head_dim}; use --attention-backend triton")
        flashinfer = import_flashinfer()
        group = self.num_q_heads // self.num_kv_heads
        self.use_tensor_cores = group not in CUDA_CORE_DECODE_GROUPS
        self.prefill_backend = prefill_backend
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)   # zeroed: FlashInfer asks

        def wrappers() -> _Wrappers:
            return _Wrappers(
                decode={w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2")
                    for w in self.sliding_windows},
                extend={w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=prefill_backend)
                        for w in self.sliding_windows})

        # Two sets, used on alternate steps: plan() copies its host data to the device from the
        # wrapper's pinned buffer asynchronously, and with the overlap scheduler the host plans
        # step N+1 while step N may not have started. Step N+2 plans only after step N finished.
        self._sets = (wrappers(), wrappers())
        self._steps = 0
        self._wrappers: dict[Optional[int], Any] = {}   # this step's, by sliding window
        self._planned_scaling = self.head_dim ** -0.5
        self._plan_types = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self._planned_scaling)
        self._flashinfer = flashinfer
        self._workspace = workspace
        # device graphs (reserve / begin_graph_capture / prepare_graph_replay), by (batch size, window)
        self._graph_wrappers: dict[tuple[int, Optional[int]], Any] = {}
        self._graph_plan_copied: dict[tuple[int, Optional[int]], torch.cuda.Event] = {}
        self._graph_indptr = self._graph_indices = self._graph_last_page_len = None
        self._capturing = False
        logger.info("flashinfer %s attention: %s decode (group %d), %s extend kernels%s", flashinfer.__version__,
                    "tensor-core" if self.use_tensor_cores else "CUDA-core", group, prefill_backend,
                    "" if self.sliding_windows == (None,) else f", windows {self.sliding_windows}")

    # -- metadata ------------------------------------------------------------------------------
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if self._capturing:      # planned by begin_graph_capture, outside the capture
            return
        wrappers = self._sets[self._steps % 2]
        self._steps += 1
        kv_table = self._kv_table(batch)
        if batch.mode.is_decode:
            for w, wrapper in wrappers.decode.items():
                self._plan_decode(wrapper, kv_table, w)
            self._wrappers = wrappers.decode
        else:
            qo_indptr = _indptr(torch.tensor(batch.extend_seq_lens_cpu, dtype=torch.int32))
            for w, wrapper in wrappers.extend.items():
                wrapper.plan(qo_indptr, *kv_table, self.num_q_heads, self.num_kv_heads, self.head_dim,
                             self.page_size, causal=True, window_left=window_left(w), **self._plan_types)
            self._wrappers = wrappers.extend

    def _kv_table(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's paged KV in FlashInfer's CSR form: kv_indptr (host), kv_indices (device),
        kv_last_page_len (host)."""
        kv_indptr, kv_last_page_len = host_page_table(batch.seq_lens_cpu, self.page_size)
        kv_indices = page_indices(self.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                  int(kv_indptr[-1]), self.page_size)
        return kv_indptr, kv_indices, kv_last_page_len

    def _plan_decode(self, wrapper: Any, kv_table: tuple[torch.Tensor, ...], window: Optional[int]) -> None:
        wrapper.plan(*kv_table, self.num_q_heads, self.num_kv_heads, self.head_dim, self.page_size,
                     window_left=window_left(window), **self._plan_types)

    # -- device graphs -------------------------------------------------------------------------
    def reserve(self, max_batch_size: int) -> None:
        """Decode steps of up to ``max_batch_size`` requests may be captured: allocate the fixed
        page-table buffers every captured wrapper reads."""
        pages = self.kv_pool.capacity // self.page_size + max_batch_size
        if self._graph_indices is None or self._graph_indices.numel() < pages:
            self._graph_indptr = torch.zeros(max_batch_size + 1, dtype=torch.int32, device=self.device)
            self._graph_indices = torch.zeros(pages, dtype=torch.int32, device=self.device)
            self._graph_last_page_len = torch.ones(max_batch_size, dtype=torch.int32, device=self.device)

    def fits_graph(self, batch: ForwardBatch) -> bool:
        """Whether the batch's pages (at most sum // page_size plus one partial page a request), and
        one page a padded row, fit the captured steps' page table."""
        pages = sum(batch.seq_lens_cpu) // self.page_size + batch.batch_size
        return self._graph_indices is not None and pages + batch.batch_size <= self._graph_indices.numel()

    def begin_graph_capture(self, batch: ForwardBatch) -> None:
        """Every window's wrapper of this size plans the same page table into the same buffers."""
        bs = batch.batch_size
        for w in self.sliding_windows:
            if (bs, w) not in self._graph_wrappers:
                self._graph_wrappers[bs, w] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2",
                    use_cuda_graph=True, paged_kv_indptr_buffer=self._graph_indptr[: bs + 1],
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=self._graph_last_page_len[:bs])
        self._plan_graph(batch)
        self._wrappers = {w: self._graph_wrappers[bs, w] for w in self.sliding_windows}
        self._capturing = True

    def end_graph_capture(self) -> None:
        self._capturing = False

    def prepare_graph_replay(self, batch: ForwardBatch) -> None:
        self._plan_graph(batch)

    def _plan_graph(self, batch: ForwardBatch) -> None:
        """Plan the captured wrappers of the batch's size with the batch's lengths. plan() stages its
        work split in the wrapper's pinned buffer and copies it to the device in stream order;
        the previous plan's copy must have left that buffer first (it has, unless the device is
        still on the step before it: the wait is short)."""
        bs = batch.batch_size
        kv_table = self._kv_table(batch)
        for w in self.sliding_windows:
            copied = self._graph_plan_copied.get((bs, w))
            if copied is not None:
                copied.synchronize()
            self._plan_decode(self._graph_wrappers[bs, w], kv_table, w)
            if copied is None:
                copied = self._graph_plan_copied[bs, w] = torch.cuda.Event()
            copied.record()

    # -- per layer -----------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scaling: float,
                batch: ForwardBatch, *, sliding_window: Optional[int] = None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        wrapper = self._wrappers.get(sliding_window)
        if wrapper is None:
            raise ValueError(f"layer {layer_id} has sliding window {sliding_window}, which the backend was not "
                             f"built for (sliding_windows={self.sliding_windows})")
        self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)             # NHD pages
        kv_cache = (self.kv_pool.k_buffers[layer_id].view(shape), self.kv_pool.v_buffers[layer_id].view(shape))
        q = q.contiguous()
        # plan() fixed the softmax scale at 1/sqrt(head_dim); FlashInfer folds q_scale into it
        q_scale = None if scaling == self._planned_scaling else scaling / self._planned_scaling
        return wrapper.run(q, kv_cache, q_scale=q_scale, out=torch.empty_like(q))


def host_page_table(seq_lens: list[int], page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_indptr [B + 1] and kv_last_page_len [B], int32 on the host."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pages = (lens + page_size - 1) // page_size
    return _indptr(pages), lens - (pages - 1) * page_size


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    """[n + 1] int32 exclusive prefix sums of counts [n] (host)."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(counts, 0)
    return out
