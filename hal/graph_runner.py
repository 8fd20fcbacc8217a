"""The graph_runner role: capture the model's decode step once per batch size, replay it per step.

A decode step of a few hundred small kernels costs more to launch than to run at small batch
sizes; a captured step is one launch. This base class owns what every device's graphs share:
the batch sizes, the static input buffers every captured step reads, padding a batch up to the
next captured size, and the replay flow. A vendor subclass (``backends/<vendor>/``) supplies the
device's graph object, its memory pool and its capture stream. The sampler stays outside.

Padded rows must never touch real KV: they write their K/V to ``pad_slot`` (a KV slot that the
allocator never hands out) and read one position of row ``pad_req_row`` of ``req_to_token``
(any row: column 0 always holds a valid slot, and the padded rows' outputs are discarded).
"""
from __future__ import annotations

import bisect
import logging
import sys
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from engine.runner.forward_batch import ForwardBatch, ForwardMode
from hal.attention import AttentionBackend

logger = logging.getLogger(__name__)

# Rows of the static input buffer, in order.
INPUT_ROWS = ("input_ids", "positions", "req_pool_indices", "seq_lens", "out_cache_loc")


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, then every 16 up to ``max_batch_size`` (which is always included)."""
    if max_batch_size < 1:
        raise ValueError(f"the largest captured batch size must be >= 1, got {max_batch_size}")
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, max_batch_size + 1, 16))
    sizes = [s for s in sizes if s <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def shown_sizes(sizes: list[int]) -> str:
    """Captured sizes for a log line: all of up to 8, else the first two and the last."""
    return ",".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]},{sizes[1]},...,{sizes[-1]}"


def attention_can_be_captured(attn_backend: Any) -> bool:
    """A backend whose decode reads only device tensors offers ``reserve(max_batch_size)``: it
    allocates its scratch for every batch size up front, so captured pointers stay valid."""
    return callable(getattr(attn_backend, "reserve", None))


class GraphRunner(ABC):
    """Decode steps captured for ``batch_sizes``; ``replay`` runs a batch of any size up to the
    largest, padded to the next captured size.

    ``forward(batch) -> logits [batch_size, vocab] fp32`` is the eager step (attention metadata +
    model); it is what gets captured, so graphs and eager run the same code.
    """

    name: str = "base"

    def __init__(self, *, forward: Callable[[ForwardBatch], torch.Tensor], attn_backend: Any,
                 max_batch_size: int, max_running_requests: int, pad_slot: int, pad_req_row: int,
                 device: torch.device) -> None:
        self.forward = forward
        self.attn_backend = attn_backend
        # whether the backend prepares each replay on the host (hal/attention.py's graph hooks)
        self._plans_on_host = (type(attn_backend).prepare_graph_replay
                               is not AttentionBackend.prepare_graph_replay)
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        self.max_running_requests = max_running_requests
        self.device = device
        n = self.batch_sizes[-1]
        # [5, max_bs] int64: the rows INPUT_ROWS, read by every captured step
        self._inputs = torch.zeros(len(INPUT_ROWS), n, dtype=torch.int64, device=device)
        pad = {"input_ids": 0, "positions": 0, "req_pool_indices": pad_req_row, "seq_lens": 1,
               "out_cache_loc": pad_slot}
        # [5, max_bs] int64: what a padded row holds
        self._pad = torch.tensor([pad[r] for r in INPUT_ROWS], dtype=torch.int64,
                                 device=device)[:, None].expand(-1, n).contiguous()
        self._inputs.copy_(self._pad)
        self._graphs: dict[int, Any] = {}
        # logits [max_bs, vocab] fp32: the largest captured step's output, which every smaller
        # step writes the first rows of (one buffer, not one per batch size)
        self._logits: Optional[torch.Tensor] = None
        self.capture_seconds = 0.0

    # -- vendor hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _capture_one(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Warm ``fn`` up, then capture it into a new graph that shares this runner's memory pool;
        returns (graph, the output tensor the graph writes)."""

    @abstractmethod
    def _replay(self, graph: Any) -> None:
        """Launch ``graph`` on the current stream."""

    # -- capture ---------------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def static_batch(self, batch_size: int) -> ForwardBatch:
        """The decode batch that reads the first ``batch_size`` columns of the static inputs."""
        v = {name: self._inputs[i, :batch_size] for i, name in enumerate(INPUT_ROWS)}
        return ForwardBatch(mode=ForwardMode.DECODE, batch_size=batch_size, input_ids=v["input_ids"],
                            positions=v["positions"], req_pool_indices=v["req_pool_indices"],
                            seq_lens=v["seq_lens"], out_cache_loc=v["out_cache_loc"],
                            seq_lens_cpu=[1] * batch_size, logits_indices=None,
                            logits_out=None if self._logits is None else self._logits[:batch_size])

    def capture(self) -> None:
        """Capture every batch size, largest first (the smaller ones then reuse its memory)."""
        t0 = time.perf_counter()
        # Scratch for every batch size the eager path may run too: growing it later would free
        # memory that the captured steps still write.
        self.attn_backend.reserve(max(self.max_running_requests, self.max_batch_size))
        sizes = tqdm(list(reversed(self.batch_sizes)), desc=f"capturing {self.name} decode steps", unit="size",
                     disable=not sys.stderr.isatty())
        with torch.inference_mode():
            for bs in sizes:
                sizes.set_postfix_str(f"batch size {bs}")
                batch = self.static_batch(bs)
                try:
                    self.attn_backend.begin_graph_capture(batch)
                    try:
                        self._graphs[bs], out = self._capture_one(lambda b=batch: self.forward(b))
                    finally:
                        self.attn_backend.end_graph_capture()
                except Exception as e:
                    raise RuntimeError(f"capturing the decode step at batch size {bs} failed ({e}); "
                                       "lower --cuda-graph-max-bs, or serve eagerly with "
                                       "--disable-cuda-graph") from e
                if self._logits is None:
                    self._logits = out
                assert out.data_ptr() == self._logits.data_ptr(), "a captured step wrote its own logits"
        self.capture_seconds = time.perf_counter() - t0

    # -- replay ----------------------------------------------------------------------------------
    def padded_size(self, batch_size: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.mode.is_decode and bool(self._graphs) and 1 <= batch.batch_size <= self.max_batch_size
                and batch.num_tokens == batch.batch_size and self.attn_backend.fits_graph(batch))

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch_size, vocab] fp32 of a decode batch. The tensor is the graph's own output:
        use it (sample) before the next replay."""
        bs = batch.batch_size
        padded = self.padded_size(bs)
        src = torch.stack([getattr(batch, name) for name in INPUT_ROWS])   # [5, bs] int64, one kernel
        if padded > bs:
            src = torch.cat([src, self._pad[:, : padded - bs]], dim=1)     # [5, padded]
        self._inputs[:, :padded].copy_(src)
        if self._plans_on_host:
            static = self.static_batch(padded)
            static.seq_lens_cpu = list(batch.seq_lens_cpu) + [1] * (padded - bs)   # padded rows: 1 position
            self.attn_backend.prepare_graph_replay(static)
        self._replay(self._graphs[padded])
        return self._logits[:bs]

    def describe(self) -> str:
        return (f"{self.name} ({len(self.batch_sizes)} batch sizes {shown_sizes(self.batch_sizes)}, "
                f"captured in {self.capture_seconds:.1f} s)")
