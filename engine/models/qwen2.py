"""Qwen2: the Llama decoder with bias on the q/k/v projections (ModelConfig.qkv_bias)."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
