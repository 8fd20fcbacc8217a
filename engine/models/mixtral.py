"""Mixtral: the Mistral decoder with every MLP a sparse block of ``num_local_experts`` experts
(checkpoint names ``block_sparse_moe.experts.{e}.w1/w3/w2``), top-k always renormalized."""
from __future__ import annotations

from engine.models.moe import MoEForCausalLM


class MixtralForCausalLM(MoEForCausalLM):
    pass
