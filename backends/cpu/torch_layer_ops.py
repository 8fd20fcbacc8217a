"""The layer ops in plain torch: the CPU's, and the reference the fused kernels are tested against.
The math itself lives next to the layers (engine/layers) so that it reads with them."""
from __future__ import annotations

from typing import Optional, Union

import torch

from engine.layers.activation import gelu_tanh_and_mul, silu_and_mul
from engine.layers.layernorm import gemma_rms_norm, rms_norm
from engine.layers.rotary import apply_rotary
from hal.layer_ops import LayerOps


class TorchLayerOps(LayerOps):
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return rms_norm(x, weight, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_and_mul(x)

    def gemma_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return gemma_rms_norm(x, weight, eps)

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
