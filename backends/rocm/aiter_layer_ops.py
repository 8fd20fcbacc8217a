"""AiterLayerOps: the layer_ops role on ROCm with aiter's fused element-wise kernels
(github.com/ROCm/aiter); everything else stays on the Triton layer ops it extends.

Written against aiter's Python API as of ROCm/aiter main, 2025-26 (``aiter/ops/rmsnorm.py`` and
``aiter/ops/activation.py``, exported at the package's top level); it has never run on AMD
hardware. Three functions, called positionally as those files declare them:

- ``rmsnorm2d_fwd(input, weight, epsilon) -> out``: weight * norm(input), a new tensor;
- ``rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon) -> None``:
  writes ``residual_out = input + residual_in`` and ``out = weight * norm(residual_out)``, leaving
  both inputs alone (unlike ``fused_add_rms_norm_cu``, which overwrites them; our callers may still
  read x and the residual). Today's models add the residual inside the o and down projections
  (hal/layer_ops.py ``linear``), so this one is wired for the interface but off their path;
- ``silu_and_mul(out, input) -> None``: writes ``out [rows, d] = silu(input[:, :d]) * input[:, d:]``
  for a contiguous ``input [rows, 2d]``.

Every tensor goes in as a contiguous ``[rows, hidden]`` tensor, a copy only where x is not one
(aiter's norms take 2-D rows; its activation kernel steps rows by 2d). aiter's activation kernel
multiplies silu(gate) by up in fp32 before its one rounding (csrc/kernels/activation_kernels.cu),
and its norms are taken to do the same with the weight, where the torch reference rounds silu(gate)
and norm(x) first: the outputs may differ from it by one unit in the last place.

What runs on the Triton layer ops instead: rotary, linear (the GEMVs, including the norm they fold
in under ``gemv_fuse_norm``), and any call aiter's kernels do not take: dtypes other than
float16/bfloat16 (older aiter norms have no fp32 path), a weight or residual of another dtype than
x, and zero rows.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional, Union

import torch

from backends.rocm import aiter_import
from backends.triton.layer_ops import TritonLayerOps
from hal.kernel_config import KernelConfig

logger = logging.getLogger(__name__)

REQUIRED_FUNCTIONS = ("rmsnorm2d_fwd", "rmsnorm2d_fwd_with_add", "silu_and_mul")
USER = "aiter layer ops"
INSTEAD = "keep the layer ops on triton (chosen whenever aiter's are unavailable)"
DTYPES = (torch.float16, torch.bfloat16)


def import_aiter() -> Any:
    """The aiter module, or a clear error when it cannot be imported or lacks what we call."""
    return aiter_import.import_aiter(USER, REQUIRED_FUNCTIONS, INSTEAD)


@functools.lru_cache(maxsize=1)
def aiter_importable() -> bool:
    """Whether aiter imports and offers the functions we call (checked once, when selecting)."""
    return aiter_import.usable(USER, REQUIRED_FUNCTIONS, INSTEAD)


class AiterLayerOps(TritonLayerOps):
    name = "aiter"

    def __init__(self, device: Optional[torch.device] = None, kernel_config: Optional[KernelConfig] = None) -> None:
        super().__init__(device, kernel_config)
        self._aiter = import_aiter()
        logger.info("aiter layer ops (aiter %s): rms_norm (with the residual add) and silu_and_mul on aiter "
                    "for float16/bfloat16; rotary, linear and other dtypes on triton",
                    getattr(self._aiter, "__version__", "version unknown"))

    @staticmethod
    def _aiter_takes(x: torch.Tensor, *others: torch.Tensor) -> bool:
        return x.dtype in DTYPES and x.numel() > 0 and all(t.dtype == x.dtype for t in others)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        others = (weight,) if residual is None else (weight, residual)
        if not self._aiter_takes(x, *others) or (residual is not None and residual.shape != x.shape):
            return super().rms_norm(x, weight, eps, residual)
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()                                   # [rows, hidden]
        weight = weight.contiguous()
        if residual is None:
            return self._aiter.rmsnorm2d_fwd(x2, weight, float(eps)).view(x.shape)
        out, res_out = torch.empty_like(x2), torch.empty_like(x2)            # [rows, hidden] each
        self._aiter.rmsnorm2d_fwd_with_add(out, x2, residual.reshape(-1, n).contiguous(), res_out, weight,
                                           float(eps))
        return out.view(x.shape), res_out.view(x.shape)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if not self._aiter_takes(x):
            return super().silu_and_mul(x)
        d = x.shape[-1] // 2
        x2 = x.reshape(-1, 2 * d).contiguous()                               # [rows, 2d] = [gate | up]
        out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)  # [rows, d]
        self._aiter.silu_and_mul(out, x2)
        return out.view(*x.shape[:-1], d)
