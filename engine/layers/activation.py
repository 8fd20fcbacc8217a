"""SiluAndMul: the gated activation of Llama-style MLPs on a fused [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] -> [num_tokens, d] = silu(gate) * up."""
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
