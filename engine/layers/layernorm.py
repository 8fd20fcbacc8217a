"""RMSNorm, computed in fp32 like Hugging Face, with an optional fused residual add.

``rms_norm`` is the torch math (the reference); the layer calls the layer ops it was built with.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from engine.layers.ops import get_layer_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
             ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Without residual: norm(x). With residual: (norm(x + residual), x + residual), the sum
    taken in the activation dtype as the reference models do."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()   # a new fp32 buffer (or x itself in fp32: the next line then writes into x)
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
    out = h.to(dtype).mul_(weight) if dtype != torch.float32 else h.mul_(weight)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.layer_ops = get_layer_ops()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.layer_ops.rms_norm(x, self.weight, self.eps, residual)
