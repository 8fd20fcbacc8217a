"""The layer_ops role: the element-wise steps of a decoder layer that are worth a fused kernel.

Model layers (``engine/layers``) take one implementation at construction and call it every
step. The torch one (backends/cpu) runs everywhere and is the reference; the Triton one
(backends/triton) fuses each step into one kernel on GPUs. ``linear`` is here too, so that a
backend can replace the vendor BLAS where it is weak (a few rows) and fold the MLP's activation
into the down projection; by default it is F.linear. ``rms_norm_linear`` lets it fold a norm
into the linear that reads it. ``fused_moe`` runs a mixture-of-experts MLP over routed tokens;
the version here is the reference (eager, one matmul pair per expert that has tokens).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Union

import torch
import torch.nn.functional as F


class LayerOps(ABC):
    name: str = "base"
    # True where ``fused_moe`` reads no device value back to the host and launches a fixed set of
    # kernels for a given token count, so a step that calls it can be captured in a device graph;
    # the model runner keeps a mixture-of-experts model's steps eager otherwise.
    fused_moe_graph_safe: bool = False

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: [..., hidden]; weight: [hidden]. Without residual: weight * norm(x). With residual:
        (weight * norm(x + residual), x + residual), the sum rounded to x's dtype, the norm in
        fp32 and rounded to x's dtype before the weight multiplies it (as Hugging Face does)."""

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 2 * d] = [gate | up] -> [..., d] = silu(gate) * up."""

    @abstractmethod
    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 2 * d] = [gate | up] -> [..., d] = gelu_tanh(gate) * up (Gemma's GeGLU, the
        tanh approximation of GELU), the activation rounded to x's dtype before the product."""

    @abstractmethod
    def gemma_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [..., hidden]; weight: [hidden] -> norm(x) * (1 + weight) (Gemma's RMSNorm): unlike
        ``rms_norm``, the whole product is taken in fp32 and rounded once to x's dtype."""

    @abstractmethod
    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding of q: [T, Hq, D] and k: [T, Hkv, D] with cos, sin:
        [T, 1, D / 2] (the first and second halves of each head rotate as pairs). Returns new
        tensors; the inputs are left alone."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               silu_mul_input: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F.linear(x, weight, bias) (+ residual): x [..., K], weight [N, K] -> [..., N]. With
        silu_mul_input, x is the MLP's [..., 2K] = [gate | up] and the product is of
        silu_and_mul(x). The residual is added before the one rounding where the matmul can
        (addmm), which the reference's separate add rounds twice. The caller gives the residual
        up: the sum may be written over it (in-place addmm; the out-of-place one copies the
        residual first, benchmarks/RESULTS.md session 11)."""
        h = self.silu_and_mul(x) if silu_mul_input else x
        if residual is None:
            return F.linear(h, weight, bias)
        if bias is None and h.dim() == 2 and residual.shape == (h.shape[0], weight.shape[0]):
            if residual.is_contiguous() and residual.dtype == h.dtype and not residual.requires_grad:
                return residual.addmm_(h, weight.t())
            return torch.addmm(residual, h, weight.t())
        return F.linear(h, weight, bias) + residual

    def rms_norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """linear(rms_norm(x, norm_weight, eps), weight, bias) for a norm whose only reader is
        this linear (a decoder layer's input and post-attention norms); a backend may fold the
        norm into the matmul."""
        return self.linear(self.rms_norm(x, norm_weight, eps), weight, bias)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """A mixture-of-experts MLP: x [T, H]; w13 [E, 2I, H] = each expert's [gate | up]; w2
        [E, H, I] its down projection; topk_weights [T, k] (float32) and topk_ids [T, k] (any
        integer type), each token's experts and their weights. Returns [T, H] in x's dtype:
        out[t] = sum_j topk_weights[t, j] * down_e(silu_and_mul(w13_e x[t])) with e = topk_ids[t, j],
        each expert's product rounded to x's dtype (as a plain matmul would be) and the weighted
        sum accumulated in float32. With tensor parallelism I is this rank's slice and the
        result is a partial sum (the caller all-reduces).

        This reference reads the experts' token counts back to the host (one synchronization)
        and so cannot be captured in a device graph; a backend that serves MoE models under
        graphs overrides it with kernels of a fixed launch shape."""
        num_tokens, top_k = topk_ids.shape
        out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
        if num_tokens == 0:
            return out.to(x.dtype)
        flat_ids = topk_ids.reshape(-1).long()
        order = torch.argsort(flat_ids, stable=True)            # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
        weights = topk_weights.reshape(-1).float()
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            rows = pairs // top_k
            h = self.silu_and_mul(F.linear(x[rows], w13[expert]))
            y = F.linear(h, w2[expert])
            out.index_add_(0, rows, y.float() * weights[pairs, None])
        return out.to(x.dtype)
