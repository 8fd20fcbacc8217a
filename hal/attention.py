"""The attention role: write new K/V into the paged pool and attend, for extend and decode.

One instance per model runner. ``init_forward_metadata`` runs once per step, before the
layers; ``forward`` runs once per layer. Shapes: q ``[num_tokens, num_q_heads, head_dim]``,
k and v ``[num_tokens, num_kv_heads, head_dim]``; output like q.

Sliding windows: a layer with window W passes ``sliding_window=W`` to ``forward``, and each query
at position p then attends to the keys at positions p - W < j <= p only (transformers' mask).
The pool keeps every position; a backend may skip reading those before the window. Backends that
apply windows register the feature "sliding_window"; the model runner asks for it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from engine.mem_cache.kv_pool import KVPool
    from engine.runner.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, kv_pool: "KVPool",
                 req_to_token: torch.Tensor, page_size: int, dtype: torch.dtype,
                 device: torch.device, sliding_windows: tuple[Optional[int], ...] = (None,)) -> None:
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token  # [max_reqs, max_context_len] int32 KV slot per position
        self.page_size = page_size
        self.dtype = dtype
        self.device = device
        # every sliding_window the model's layers pass to forward, None for those without one (for
        # backends that plan each step per window, as FlashInfer does)
        self.sliding_windows = tuple(sliding_windows) or (None,)

    @abstractmethod
    def init_forward_metadata(self, batch: "ForwardBatch") -> None:
        """Prepare what every layer of this step needs (indices, lengths, masks)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                scaling: float, batch: "ForwardBatch", *, sliding_window: Optional[int] = None) -> torch.Tensor:
        """Store k, v at ``batch.out_cache_loc`` in layer ``layer_id``, then attend.

        Extend: request i's new tokens attend to its ``extend_prefix_lens[i]`` cached tokens
        and causally to each other. Decode: one new token per request attends to all of its
        ``seq_lens[i]`` tokens (the new one included). With ``sliding_window`` W, a token at
        position p attends only to those at positions > p - W.
        """

    def fuses_rotary(self, batch: "ForwardBatch") -> bool:
        """Whether this step's ``forward`` takes q and k unrotated with ``cos_sin=(cos, sin)`` (each
        [num_tokens, 1, head_dim / 2], neox style as layer_ops.apply_rotary) and rotates them in
        its own kernels. If not, the layer rotates them first and passes no cos_sin."""
        return False

    # -- device graphs (hal/graph_runner.py) ------------------------------------------------------
    # A backend offers capture with ``reserve(max_batch_size)``. One whose decode kernels read only
    # device tensors computed inside the step needs nothing more. One that prepares each step on
    # the host (a plan written to fixed device buffers) overrides the three hooks below.
    def begin_graph_capture(self, batch: "ForwardBatch") -> None:
        """Before the decode step of ``batch`` (the graph runner's static batch of one captured size)
        is captured: set up, outside the capture, what the captured kernels will read."""

    def end_graph_capture(self) -> None:
        """After that step was captured."""

    def fits_graph(self, batch: "ForwardBatch") -> bool:
        """Whether a captured step can run ``batch`` (else it runs eagerly)."""
        return True

    def prepare_graph_replay(self, batch: "ForwardBatch") -> None:
        """Before a captured step replays ``batch``: the static batch of the captured size, its inputs
        already written (padded rows included) and ``seq_lens_cpu`` its host lengths."""


def page_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                 total_pages: int, page_size: int) -> torch.Tensor:
    """For backends that read the KV pool by page (FlashInfer, aiter): [total_pages] int32 page ids
    of the requests' positions, request by request in position order, computed where the inputs
    live. ``total_pages`` (known on the host) spares a device read."""
    dev = seq_lens.device
    pages = (seq_lens + page_size - 1) // page_size                                 # [B]
    first = torch.cumsum(pages, 0) - pages                                          # [B]
    req = torch.repeat_interleave(torch.arange(pages.numel(), device=dev), pages,
                                  output_size=total_pages)                          # [P] request of each page
    page_no = torch.arange(total_pages, device=dev) - first[req]                    # [P] page within request
    slots = req_to_token[req_pool_indices[req], page_no * page_size]                # [P] slot of offset 0
    return (slots // page_size if page_size > 1 else slots).to(torch.int32)
