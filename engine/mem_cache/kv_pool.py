"""The paged KV pool: per layer, K and V buffers indexed by KV slot.

Slot ``s`` lives in page ``s // page_size`` at offset ``s % page_size``. Position ``i`` of a
request always sits at offset ``i % page_size`` of its page, so a request's slots for one
page-aligned block of positions are one whole page.

The pool's dtype is the model's, or an 8-bit float (--kv-cache-dtype fp8_e4m3 / fp8_e5m2) that
halves its bytes: values are stored unscaled and saturate at the format's largest finite value;
attention kernels convert what they read back to the model's dtype.
"""
from __future__ import annotations

import torch


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def to_kv_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to a pool of ``dtype``; into fp8, saturating (torch's casts give the largest value,
    inf or NaN past the range, depending on the variant)."""
    if is_fp8(dtype):
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


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
        self.k_buffers[layer_id][loc] = to_kv_dtype(k, self.dtype)
        self.v_buffers[layer_id][loc] = to_kv_dtype(v, self.dtype)
