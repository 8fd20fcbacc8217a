"""Rotary position embeddings (neox style, as Llama/Qwen/Mistral/Phi-3 use) with the scalings real
checkpoints use: default, linear, dynamic (NTK), llama3, yarn and longrope, over whole heads or
(partial rotary) their first rotary_dim dims.

The cos/sin table is built once in fp32 for every position the server admits; a step looks up
its positions once and every layer reuses the result. ``apply_rotary`` is the torch math (the
reference); layers rotate with the layer ops they were built with.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from engine.layers.ops import get_layer_ops


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim / 2]


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, blend between."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def _longrope(base: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LongRoPE (arXiv 2402.13753, Phi-3): (short inv_freq, long inv_freq, cos/sin multiplier). Each
    frequency is divided by its own factor of ``short_factor`` or ``long_factor``; the multiplier is
    ``attention_factor`` or sqrt(1 + ln(factor) / ln(original context)), factor defaulting to
    max_position_embeddings / original_max_position_embeddings, and applies to both sets."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig
    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        attn_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim                   # [dim / 2]
    inv_freqs = []
    for key in ("short_factor", "long_factor"):
        ext = torch.tensor(s[key], dtype=torch.float32)
        if ext.shape != exponent.shape:
            raise ValueError(f"longrope {key} has {ext.numel()} entries; the {dim} rotary dims need {dim // 2}")
        inv_freqs.append(1.0 / (ext * base ** exponent))
    return inv_freqs[0], inv_freqs[1], float(attn_factor)


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[dict[str, Any]], max_position_embeddings: int,
                  max_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, cos/sin multiplier) for a rope scaling dict (or None)."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return _base_inv_freq(base, head_dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, head_dim) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(_base_inv_freq(base, head_dim), scaling), 1.0
    if rope_type == "dynamic":
        # Hugging Face rescales the base from the longest sequence in the batch, which a KV cache
        # cannot follow; the base is fixed for the longest context served instead, so it equals
        # the default rope whenever that context fits max_position_embeddings.
        factor = scaling["factor"]
        seq = max(max_len, max_position_embeddings)
        base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inv_freq(base, head_dim), 1.0
    if rope_type == "yarn":
        return _yarn(base, head_dim, scaling, max_position_embeddings)
    if rope_type == "longrope":  # the short factors; RotaryEmbedding switches to the long ones
        short, _, mult = _longrope(base, head_dim, scaling, max_position_embeddings)
        return short, mult
    raise ValueError(f"rope type {rope_type!r} is not supported")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, head_dim / 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class QKRotary(nn.Module):
    """Rotates q and k together (one fused kernel where the layer ops have one). With ``rotary_dim``
    (partial rotary) only the first rotary_dim dims of each head rotate, neox style among themselves,
    and the rest pass through."""

    def __init__(self, rotary_dim: Optional[int] = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.layer_ops = get_layer_ops()

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]; cos, sin: [T, 1, R / 2] for R = rotary_dim (default D) ->
        rotated (q, k), new tensors."""
        r = self.rotary_dim
        if r is None or r == q.shape[-1]:
            return self.layer_ops.apply_rotary(q, k, cos, sin)
        q_rot, k_rot = self.layer_ops.apply_rotary(q[..., :r], k[..., :r], cos, sin)   # [T, H, R] each
        return torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_len: int, base: float, scaling: Optional[dict[str, Any]] = None,
                 max_position_embeddings: Optional[int] = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_len = max_len
        with torch.device("cpu"):
            inv_freq, mult = rope_inv_freq(head_dim, base, scaling, max_position_embeddings or max_len, max_len)
        device = torch.empty(0).device  # the device the model is being built on
        positions = torch.arange(max_len, dtype=torch.float32, device=device)[:, None]   # [max_len, 1]
        freqs = positions * inv_freq.to(device)                                          # [max_len, head_dim / 2]
        if (scaling or {}).get("rope_type") == "longrope":
            freqs = self._longrope_freqs(positions, freqs, base, scaling, max_position_embeddings or max_len)
        # [max_len, head_dim]: cos in the first half, sin in the second. A plain attribute, not a
        # buffer, so that model.to(dtype) leaves it fp32 (Hugging Face computes it in fp32 too).
        self.cos_sin_cache = torch.cat((freqs.cos() * mult, freqs.sin() * mult), dim=-1)
        self.layer_ops = get_layer_ops()

    def _longrope_freqs(self, positions: torch.Tensor, short: torch.Tensor, base: float, scaling: dict[str, Any],
                        max_pos: int) -> torch.Tensor:
        """Positions from original_max_position_embeddings on take the long factors, those below the
        short ones. transformers picks one set for the whole sequence from its length, which a KV
        cache shared across steps and requests cannot follow; per position, a sequence that stays
        within the original context is exactly transformers', and the long factors serve the
        positions only long sequences reach (cached keys below keep their short-factor rotation)."""
        with torch.device("cpu"):
            _, long_inv_freq, _ = _longrope(base, self.head_dim, scaling, max_pos)
        long = positions * long_inv_freq.to(positions.device)
        return torch.where(positions >= scaling["original_max_position_embeddings"], long, short)

    def _apply(self, fn, recurse=True):
        target = fn(torch.empty(0, device=self.cos_sin_cache.device)).device
        self.cos_sin_cache = self.cos_sin_cache.to(target)
        return super()._apply(fn, recurse)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim / 2] in ``dtype``."""
        cs = self.cos_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        return cs.chunk(2, dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.layer_ops.apply_rotary(q, k, cos, sin)


def get_rope(head_dim: int, config) -> RotaryEmbedding:
    """The rotary embedding a ModelConfig describes, with a table for its whole context, over the
    first int(head_dim * partial_rotary_factor) dims of each head (all of them for most families)."""
    rotary_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(rotary_dim, max(config.context_len, 1), config.rope_theta, config.rope_scaling,
                           config.max_position_embeddings)
