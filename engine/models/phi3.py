"""Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini): the Llama decoder whose checkpoints hold
q/k/v in one ``qkv_proj`` tensor and gate/up in one ``gate_up_proj`` tensor. Longrope, partial
rotary (Phi-4-mini) and the every-layer sliding window (Phi-3-mini-4k) come from ModelConfig."""
from __future__ import annotations

from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """``qkv_proj.weight`` [(Hq + 2 Hkv) * D, H] and ``gate_up_proj.weight`` [2 I, H] load as the fused
    parameters' shard None (each rank takes its q heads, its k/v heads and its rows of gate and of
    up); split ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` tensors load too."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, (QKVParallelLinear, MergedColumnParallelLinear)):
                module.checkpoint_fused = True      # dummy weights draw the Hub's fused tensors
