"""RMSNorm, computed in fp32 like Hugging Face, with an optional fused residual add; and Gemma's
variant (GemmaRMSNorm), which scales by (1 + weight) and rounds only once, at the end.

``rms_norm`` and ``gemma_rms_norm`` are the torch math (the references); the layers call the layer
ops they were built with.
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


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden]; weight: [hidden] -> x * rsqrt(mean(x^2) + eps) * (1 + weight), the whole
    product in fp32 (weight too) and rounded once to x's dtype. Llama's norm rounds the normalized
    x to its dtype before multiplying by the weight; in fp32 the two orders agree."""
    h = x.float()
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
    return h.mul_(weight.float() + 1.0).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.layer_ops = get_layer_ops()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.layer_ops.rms_norm(x, self.weight, self.eps, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: its checkpoint weight w is stored as it is and the norm scales by (1 + w)
    (``gemma_rms_norm``). Not an RMSNorm subclass: dummy weights draw w near 0, not 1."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.eps = eps
        self.layer_ops = get_layer_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_ops.gemma_rms_norm(x, self.weight, self.eps)
