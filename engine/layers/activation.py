"""SiluAndMul: the gated activation of Llama-style MLPs on a fused [gate | up] projection.

``silu_and_mul`` is the torch math (the reference); the layer calls the layer ops it was built with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.ops import get_layer_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] -> [num_tokens, d] = silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])   # in place: one [num_tokens, d] buffer, not two


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_ops = get_layer_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_ops.silu_and_mul(x)
