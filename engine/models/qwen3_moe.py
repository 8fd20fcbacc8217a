"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder (q/k RMSNorm, explicit head_dim)
with sparse blocks of ``moe_intermediate_size`` experts and no shared expert; top-k renormalized
when ``norm_topk_prob``."""
from __future__ import annotations

from engine.models.moe import MoEForCausalLM


class Qwen3MoeForCausalLM(MoEForCausalLM):
    pass
