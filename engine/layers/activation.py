"""The gated activations of MLPs on a fused [gate | up] projection, in torch: the references.
Llama-style models apply SiLU through their down projection (``silu_mul_input``); Gemma's GeGLU
(tanh-approximated GELU) is applied by the layer ops before the down projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] -> [num_tokens, d] = silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])   # in place: one [num_tokens, d] buffer, not two


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] -> [num_tokens, d] = gelu_tanh(gate) * up (GeGLU), where
    gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))); the activation is rounded to
    x's dtype before the product, as two separate torch ops round."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh").mul_(x[..., d:])
