"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 decoder (q/k/v bias) with sparse blocks that
add a shared expert scaled by sigmoid(shared_expert_gate(x)); ``decoder_sparse_step`` and
``mlp_only_layers`` leave some layers dense."""
from __future__ import annotations

from engine.models.moe import MoEForCausalLM


class Qwen2MoeForCausalLM(MoEForCausalLM):
    pass
