"""The attention layer models call: shapes q/k/v per head and hands them to the HAL backend
(``forward_batch.attn_backend``), which stores K/V in the paged pool and attends."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int,
                 sliding_window: Optional[int] = None) -> None:
        """sliding_window W: a query at position p attends only to keys at p - W < j <= p (the
        last W positions, itself included), as transformers' sliding-window mask; None: all of
        them. The KV pool still holds every position."""
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.num_heads = num_heads          # per tensor-parallel rank
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch,
                rotary: Optional[tuple[Callable, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q: [T, num_heads * head_dim] (or already [T, num_heads, head_dim]), k/v likewise with
        num_kv_heads -> [T, num_heads * head_dim]. rotary = (rotate, cos, sin): q and k are not
        rotated yet; the backend rotates them in its kernels where it can (fuses_rotary), else
        ``rotate(q, k, cos, sin)`` does first. Under a piecewise graph runner
        (``forward_batch.piecewise``, hal/piecewise_graph.py) the runner takes q/k/v and calls
        ``attend`` itself between the captured pieces."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if getattr(forward_batch, "piecewise", None) is not None:   # captured in pieces: attention runs between them
            out = forward_batch.piecewise.attention(self, q, k, v, rotary, forward_batch)
        else:
            out = self.attend(q, k, v, forward_batch, rotary)
        return out.reshape(t, self.num_heads * self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch,
               rotary: Optional[tuple[Callable, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]
        from the backend (which stores k and v in the pool first). The window goes to the backend
        only when the layer has one, so backends without sliding-window support keep working for
        models without it."""
        backend, kw = forward_batch.attn_backend, {}
        if self.sliding_window is not None:
            kw["sliding_window"] = self.sliding_window
        if rotary is not None:
            rotate, cos, sin = rotary
            if backend.fuses_rotary(forward_batch):
                kw["cos_sin"] = (cos, sin)
            else:
                q, k = rotate(q, k, cos, sin)
        return backend.forward(q, k, v, self.layer_id, self.scaling, forward_batch, **kw)
