"""The gated activation of Llama-style MLPs on a fused [gate | up] projection, in torch: the
reference. Models apply it through their down projection (``silu_mul_input``), which calls the
layer ops the layer was built with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] -> [num_tokens, d] = silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])   # in place: one [num_tokens, d] buffer, not two
