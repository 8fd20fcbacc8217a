"""Mistral: the Llama decoder. Its sliding window (config.json's ``sliding_window``, on every
layer) is attention's: ModelConfig gives each layer the window and the attention backend applies it."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
