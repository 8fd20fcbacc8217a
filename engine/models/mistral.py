"""Mistral: the Llama decoder. Its sliding window is handled by ModelConfig capping the context
length to the window, where full attention equals sliding-window attention."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
