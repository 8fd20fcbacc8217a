"""The attention layer models call: shapes q/k/v per head and hands them to the HAL backend
(``forward_batch.attn_backend``), which stores K/V in the paged pool and attends."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int) -> None:
        super().__init__()
        self.num_heads = num_heads          # per tensor-parallel rank
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch,
                rotary: Optional[tuple[Callable, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q: [T, num_heads * head_dim] (or already [T, num_heads, head_dim]), k/v likewise with
        num_kv_heads -> [T, num_heads * head_dim]. rotary = (rotate, cos, sin): q and k are not
        rotated yet; the backend rotates them in its kernels where it can (fuses_rotary), else
        ``rotate(q, k, cos, sin)`` does first."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        backend, kw = forward_batch.attn_backend, {}
        if rotary is not None:
            rotate, cos, sin = rotary
            if backend.fuses_rotary(forward_batch):
                kw["cos_sin"] = (cos, sin)
            else:
                q, k = rotate(q, k, cos, sin)
        out = backend.forward(q, k, v, self.layer_id, self.scaling, forward_batch, **kw)
        return out.reshape(t, self.num_heads * self.head_dim)
