"""The paged KV pool: per layer, K and V buffers indexed by KV slot.

Slot ``s`` lives in page ``s // page_size`` at offset ``s % page_size``. Position ``i`` of a
request always sits at offset ``i % page_size`` of its page, so a request's slots for one
page-aligned block of positions are one whole page.
"""
from __future__ import annotations

import torch


class KVPool:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_pages: int, page_size: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.page_size = page_size
        self.num_pages = num_pages
        self.capacity = num_pages * page_size
        # [capacity, num_kv_heads, head_dim] per layer
        self.k_buffers = [torch.zeros(self.capacity, num_kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(self.capacity, num_kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """loc: [num_tokens] int64 slots; k, v: [num_tokens, num_kv_heads, head_dim]."""
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)
