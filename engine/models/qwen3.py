"""Qwen3: the Llama decoder with RMSNorm over each head of q and k before RoPE
(ModelConfig.qk_norm) and an explicit head_dim that need not be hidden_size / num_heads."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
