"""Mixture-of-experts layers: the router's top-k choice of experts (``select_experts``) and the
experts' weights (``FusedMoE``), all experts of a layer in two stacked tensors. The expert MLPs
run through the layer ops' ``fused_moe`` (hal/layer_ops.py), which a backend may replace.

Tensor parallelism splits the intermediate dim of every expert, as a row-parallel MLP splits a
dense one: each rank holds every expert's slice, routes every token and returns a partial sum
that the caller all-reduces once (with a shared expert's partial sum, where the model has one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.layers.ops import get_layer_ops
from engine.layers.parallel_state import get_tp_rank, get_tp_size

# (expert index, "w1" | "w3" | "w2"): Mixtral's names for gate_proj, up_proj and down_proj
ExpertShardId = tuple[int, str]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64): the softmax
    over all E experts in float32, its k largest, divided by their sum when ``renormalize``
    (Mixtral always; Qwen-MoE when ``norm_topk_prob``). Device ops only, so a graph can hold it;
    the softmax comes before the top-k (not after) because without renormalizing the weights are
    the probabilities among all experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)   # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                      # [T, k] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The routed experts of one layer: ``w13_weight`` [E, 2 * I / tp, H] holds each expert's
    [gate | up] rows of this rank and ``w2_weight`` [E, H, I / tp] its down projection's columns.
    ``forward(x, router_logits)`` returns this rank's partial sum [T, H] (not all-reduced).

    Checkpoints hold one tensor per expert and projection; ``weight_loader`` takes them with shard
    ids ``(e, "w1")`` (gate [I, H]), ``(e, "w3")`` (up [I, H]) and ``(e, "w2")`` (down [H, I])."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, *, tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = get_tp_size() if tp_size is None else tp_size
        if intermediate_size % self.tp_size:
            raise ValueError(f"the experts' intermediate size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size {self.tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.rank_intermediate = intermediate_size // self.tp_size
        self.layer_ops = get_layer_ops()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.rank_intermediate, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.rank_intermediate),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ExpertShardId) -> None:
        """Copy this rank's slice of one expert's checkpoint tensor (a tensor or the loader's
        LazyTensor, read by ``narrow``): rows [r*I/tp, (r+1)*I/tp) of its gate or up projection
        into the first or second half of ``w13_weight[e]``, those columns of its down projection
        into ``w2_weight[e]``."""
        expert, proj = shard_id
        expected = self.checkpoint_shapes(param).get(shard_id)
        if expected is None:
            raise ValueError(f"no expert shard {shard_id!r} for this parameter (experts 0..{self.num_experts - 1}, "
                             f"w1/w3 for w13_weight, w2 for w2_weight)")
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {expert} {proj}: checkpoint tensor has shape {tuple(loaded.shape)} but the "
                             f"model expects {expected}; does config.json match the weights?")
        n = self.rank_intermediate
        if proj == "w2":
            param.data[expert].copy_(loaded.narrow(1, self.tp_rank * n, n))
        else:
            offset = 0 if proj == "w1" else n
            param.data[expert].narrow(0, offset, n).copy_(loaded.narrow(0, self.tp_rank * n, n))

    def checkpoint_shapes(self, param: nn.Parameter) -> dict[ExpertShardId, tuple[int, ...]]:
        """The full (unsharded) shape of each per-expert checkpoint tensor of ``param``, by shard id
        (dummy weights draw these, so every tensor-parallel size slices the same tensors)."""
        h, i = self.hidden_size, self.intermediate_size
        if param is self.w2_weight:
            return {(e, "w2"): (h, i) for e in range(self.num_experts)}
        return {(e, proj): (i, h) for e in range(self.num_experts) for proj in ("w1", "w3")}

    def shard_ids_of(self, param: nn.Parameter) -> set[ExpertShardId]:
        """Every shard id ``param`` needs before it is fully loaded."""
        return set(self.checkpoint_shapes(param))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H] (already normed), router_logits [T, E] -> this rank's partial sum [T, H]."""
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self.layer_ops.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
