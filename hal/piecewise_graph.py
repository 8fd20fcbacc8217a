"""The piecewise_graph_runner role: extend steps (prefill chunks, mixed steps) as device graphs
with the attention left out, one set per padded token count.

An eager extend step of a small or medium size (a mixed step of a few hundred tokens) costs more
host time to launch, a dozen kernels per layer, than the device needs to run it. What the model
does between two attention calls (the o projection, the MLP, the norms and the next layer's q/k/v
projection) depends only on the number of tokens, so it is captured once per token count.
Attention depends on the batch (lengths, prefixes, the page table) and runs eagerly in between,
on the real tokens only. SGLang calls this piecewise CUDA graphs.

Capture: the model's stack (``model.model``) runs once per token count with
``ForwardBatch.piecewise`` set to this runner. Each Attention layer hands its q/k/v to
``attention()``, which copies them into static buffers (inside the graph being captured), ends
that graph, begins the next one and returns the static output buffer the next piece reads. The
last piece ends with a copy of the final hidden states into a static buffer. Replay: piece 0, the
attention of layer 0 on the real rows, piece 1, ..., the last piece; the caller then computes the
logits eagerly from the real rows' hidden states (so prompt logprobs and verify steps work too).

Padded rows (the token count rounded up to a captured one) hold whatever the static inputs held
(valid token ids and positions of an earlier step). Every captured op works row by row, so they
never reach the real rows; attention never sees them. One set of static buffers, sized for the
largest count, serves every count: the pieces run one after another on one stream.

All token counts share one memory pool and the pieces of one count are captured in the order they
replay, so a tensor one piece writes and a later piece reads (the residual stream) is never
handed to a piece in between. A vendor subclass (``backends/<vendor>/``) supplies the graph
object, the pool and the capture stream.
"""
from __future__ import annotations

import bisect
import sys
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from engine.runner.forward_batch import ForwardBatch, ForwardMode
from hal.graph_runner import shown_sizes

# warm-up runs per token count before its capture: Triton compiles for the shape, cuBLAS sets up
# its workspace on the capture stream
_WARMUP_RUNS = 2


def capture_token_counts(max_tokens: int) -> list[int]:
    """8, 16, 32, then every 32 up to 256, every 64 up to 1,024, every 128 beyond, up to
    ``max_tokens`` (always included). Below ~256 rows a step's GEMMs are bound by the weight
    reads, so padding there costs little; above, the spacing keeps the padding under ~12%."""
    if max_tokens < 1:
        raise ValueError(f"the largest captured token count must be >= 1, got {max_tokens}")
    counts = [8, 16] + list(range(32, 257, 32)) + list(range(320, 1025, 64)) + list(range(1152, max_tokens + 1, 128))
    counts = [c for c in counts if c <= max_tokens]
    if not counts or counts[-1] != max_tokens:
        counts.append(max_tokens)
    return counts


class PiecewiseGraphRunner(ABC):
    """``replay(batch) -> hidden [num_tokens, hidden_size]`` for extend batches of up to
    ``max_tokens`` tokens. ``model`` has ``.model(input_ids, positions, forward_batch) -> hidden``
    (the decoder stack, final norm included) whose attention layers call ``attention()`` when
    ``forward_batch.piecewise`` is set."""

    name: str = "base"

    def __init__(self, *, model: Any, attn_backend: Any, max_tokens: int, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.attn_backend = attn_backend
        self.token_counts = capture_token_counts(max_tokens)
        self.device = device
        n = self.token_counts[-1]
        z = dict(device=device)
        self._ids = torch.zeros(n, dtype=torch.int64, **z)
        self._pos = torch.zeros(n, dtype=torch.int64, **z)
        self._q = torch.zeros(n, num_q_heads, head_dim, dtype=dtype, **z)
        self._k = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, **z)
        self._v = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, **z)
        self._out = torch.zeros(n, num_q_heads * head_dim, dtype=dtype, **z)   # what the next piece reads
        self._hidden = torch.zeros(n, hidden_size, dtype=dtype, **z)           # the last piece's output
        # per token count: its pieces, in replay order (one more than the attention layers)
        self._pieces: dict[int, list[Any]] = {}
        # the attention layers in call order
        self._layers: list[Any] = []
        self._recording: Optional[list] = None      # the layers seen by the forward being captured
        self._capturing: Optional[int] = None       # the token count being captured
        self.capture_seconds = 0.0
        self.replays = 0                            # extend steps run through the pieces

    # -- vendor hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _capture_stream(self) -> AbstractContextManager:
        """A context in which warm-up and capture run on the capture stream (and the current
        stream waits for it on exit)."""

    @abstractmethod
    def _begin_piece(self) -> Any:
        """Begin capturing a new graph into this runner's pool; returns it."""

    @abstractmethod
    def _end_piece(self, graph: Any) -> None:
        """End the capture of ``graph``."""

    @abstractmethod
    def _replay(self, graph: Any) -> None:
        """Launch ``graph`` on the current stream."""

    # -- capture ---------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.token_counts[-1]

    def _static_batch(self, num_tokens: int) -> ForwardBatch:
        """An extend batch over the first ``num_tokens`` static inputs: what the model stack
        reads in a piece (the attention metadata is the real batch's, at replay)."""
        one = torch.zeros(1, dtype=torch.int64, device=self.device)
        return ForwardBatch(mode=ForwardMode.EXTEND, batch_size=1, input_ids=self._ids[:num_tokens],
                            positions=self._pos[:num_tokens], req_pool_indices=one, seq_lens=one + num_tokens,
                            out_cache_loc=self._ids[:num_tokens], seq_lens_cpu=[num_tokens],
                            extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[num_tokens],
                            attn_backend=self.attn_backend, piecewise=self)

    def _run_stack(self, num_tokens: int) -> torch.Tensor:
        batch = self._static_batch(num_tokens)
        return self.model.model(batch.input_ids, batch.positions, batch)

    def capture(self) -> None:
        """Capture every token count, largest first (the smaller ones then reuse its memory)."""
        t0 = time.perf_counter()
        counts = tqdm(list(reversed(self.token_counts)), desc=f"capturing {self.name} extend steps", unit="size",
                      disable=not sys.stderr.isatty())
        with torch.inference_mode(), self._capture_stream():
            for n in counts:
                counts.set_postfix_str(f"{n} tokens")
                try:
                    self._capture_count(n)
                except torch.OutOfMemoryError:
                    raise               # the model runner says which flags to lower
                except Exception as e:
                    self._capturing = self._recording = None
                    raise RuntimeError(f"capturing the extend step at {n} tokens in pieces failed ({e}); lower "
                                       "--piecewise-cuda-graph-max-tokens or leave out "
                                       "--enable-piecewise-cuda-graph") from e
        self.capture_seconds = time.perf_counter() - t0

    def _capture_count(self, n: int) -> None:
        for _ in range(_WARMUP_RUNS):
            self._recording = []
            self._run_stack(n)
        if not self._layers:
            self._layers = self._recording
        elif [id(m) for m in self._recording] != [id(m) for m in self._layers]:
            raise RuntimeError("the model called its attention layers in another order at another token count")
        self._recording, self._capturing = [], n
        pieces = self._pieces[n] = [self._begin_piece()]
        hidden = self._run_stack(n)
        self._hidden[:n].copy_(hidden)
        self._end_piece(pieces[-1])
        self._capturing = self._recording = None
        if len(pieces) != len(self._layers) + 1:
            raise RuntimeError(f"{len(pieces)} pieces for {len(self._layers)} attention layers")

    def attention(self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  rotary: Optional[tuple[Callable, torch.Tensor, torch.Tensor]], batch: ForwardBatch) -> torch.Tensor:
        """Called by an Attention layer while the stack runs under this runner (warm-up or
        capture): rotate and stage q/k/v, end the current piece and begin the next; returns the
        buffer the attention output will be in."""
        t = q.shape[0]
        if rotary is not None:
            if self.attn_backend.fuses_rotary(batch):
                raise NotImplementedError(f"{type(self.attn_backend).__name__} rotates q and k in its extend "
                                          "kernels, which a piecewise graph does not stage")
            rotate, cos, sin = rotary
            q, k = rotate(q, k, cos, sin)
        self._q[:t].copy_(q.view(t, *self._q.shape[1:]))
        self._k[:t].copy_(k.view(t, *self._k.shape[1:]))
        self._v[:t].copy_(v.reshape(t, *self._v.shape[1:]))
        if self._recording is not None:
            self._recording.append(layer)
        if self._capturing is not None:
            pieces = self._pieces[self._capturing]
            self._end_piece(pieces[-1])
            pieces.append(self._begin_piece())
        return self._out[:t]

    # -- replay ----------------------------------------------------------------------------------
    def padded_count(self, num_tokens: int) -> int:
        return self.token_counts[bisect.bisect_left(self.token_counts, num_tokens)]

    def can_run(self, batch: ForwardBatch) -> bool:
        return not batch.mode.is_decode and bool(self._pieces) and 1 <= batch.num_tokens <= self.max_tokens

    def _load(self, batch: ForwardBatch) -> None:
        """The step's inputs into the static buffers, its attention metadata into the backend."""
        n = batch.num_tokens
        self._ids[:n].copy_(batch.input_ids)
        self._pos[:n].copy_(batch.positions)
        batch.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(batch)

    def _rows(self, n: int) -> tuple[torch.Tensor, ...]:
        """Views of the first n rows of the staged q, k, v and of the attention output (once a step)."""
        return self._q[:n], self._k[:n], self._v[:n], self._out[:n]

    @staticmethod
    def _attend(layer: Any, batch: ForwardBatch, rows: tuple[torch.Tensor, ...]) -> None:
        """``layer``'s attention over the real rows' staged q/k/v, into the next piece's input."""
        q, k, v, out = rows
        out.copy_(layer.attend(q, k, v, batch).view(out.shape))

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states [num_tokens, hidden] of an extend batch; valid until the next
        replay."""
        n = batch.num_tokens
        pieces = self._pieces[self.padded_count(n)]
        self._load(batch)
        rows = self._rows(n)
        for piece, layer in zip(pieces, self._layers):
            self._replay(piece)
            self._attend(layer, batch, rows)
        self._replay(pieces[-1])
        self.replays += 1
        return self._hidden[:n]

    def describe(self) -> str:
        return (f"{self.name} ({len(self.token_counts)} token counts {shown_sizes(self.token_counts)}, "
                f"captured in {self.capture_seconds:.1f} s)")
