"""The attention layer models call: shapes q/k/v per head and hands them to the HAL backend
(``forward_batch.attn_backend``), which stores K/V in the paged pool and attends."""
from __future__ import annotations

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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch) -> torch.Tensor:
        """q: [T, num_heads * head_dim] (or already [T, num_heads, head_dim]), k/v likewise with
        num_kv_heads -> [T, num_heads * head_dim]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = forward_batch.attn_backend.forward(q, k, v, self.layer_id, self.scaling, forward_batch)
        return out.reshape(t, self.num_heads * self.head_dim)
