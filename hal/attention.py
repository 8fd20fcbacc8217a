"""The attention role: write new K/V into the paged pool and attend, for extend and decode.

One instance per model runner. ``init_forward_metadata`` runs once per step, before the
layers; ``forward`` runs once per layer. Shapes: q ``[num_tokens, num_q_heads, head_dim]``,
k and v ``[num_tokens, num_kv_heads, head_dim]``; output like q.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.mem_cache.kv_pool import KVPool
    from engine.runner.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, kv_pool: "KVPool",
                 req_to_token: torch.Tensor, page_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token  # [max_reqs, max_context_len] int32 KV slot per position
        self.page_size = page_size
        self.dtype = dtype
        self.device = device

    @abstractmethod
    def init_forward_metadata(self, batch: "ForwardBatch") -> None:
        """Prepare what every layer of this step needs (indices, lengths, masks)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                scaling: float, batch: "ForwardBatch") -> torch.Tensor:
        """Store k, v at ``batch.out_cache_loc`` in layer ``layer_id``, then attend.

        Extend: request i's new tokens attend to its ``extend_prefix_lens[i]`` cached tokens
        and causally to each other. Decode: one new token per request attends to all of its
        ``seq_lens[i]`` tokens (the new one included).
        """
