"""What the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) share: the sparse MLP
block that takes a dense MLP's place in the Llama decoder layer, and the mapping of checkpoint
names onto FusedMoE's per-expert shards. The families differ only in ModelConfig fields (shared
expert, q/k norm, q/k/v bias, which layers are sparse, renormalized top-k)."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from engine.layers.linear import ReplicatedLinear
from engine.layers.moe import FusedMoE
from engine.layers.parallel_state import get_tp_collectives, get_tp_size
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM, LlamaMLP

# checkpoint projection name of one expert -> FusedMoE shard: Mixtral's w1/w3/w2, Qwen's names
_EXPERT_PROJ = {"w1": "w1", "w3": "w3", "w2": "w2", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class SparseMoeBlock(nn.Module):
    """x + moe(norm(x)) for the residual stream x [T, H]: a router (``gate``, replicated) picks
    ``num_experts_per_tok`` experts per token, the experts (``experts``, each rank a slice of every
    expert's intermediate dim) run through the layer ops' fused_moe; Qwen2-MoE adds a dense
    ``shared_expert`` scaled per token by sigmoid(``shared_expert_gate``). Both partial sums are
    added before the one all-reduce of the layer's MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.gate = ReplicatedLinear(h, config.num_experts)
        self.experts = FusedMoE(config.num_experts, config.num_experts_per_tok, h, config.moe_intermediate_size,
                                renormalize=config.norm_topk_prob)
        if config.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(h, 1)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.tp_size = get_tp_size()
        self.collectives = get_tp_collectives()

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        h = norm(x)                                   # [T, H], read by the router and every expert
        out = self.experts(h, self.gate(h))           # [T, H], this rank's partial sum
        if self.shared_expert is not None:
            shared = self.shared_expert.down_proj(self.shared_expert.gate_up_proj(h), silu_mul_input=True)
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * shared   # gate [T, 1]: same on every rank
        if self.tp_size > 1:
            out = self.collectives.all_reduce(out)
        return x + out


def unfuse_experts(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with transformers' in-memory expert layout (``...experts.gate_up_proj``
    [E, 2I, H] = each expert's [gate | up], ``...experts.down_proj`` [E, H, I]) split into the Hub's
    per-expert tensors (``...experts.{e}.gate_proj.weight``, ...); every other tensor as it is.
    A LazyTensor is read one expert at a time."""
    for name, tensor in weights:
        prefix, _, last = name.rpartition(".")
        if not prefix.endswith("experts") or last not in ("gate_up_proj", "down_proj") or len(tensor.shape) != 3:
            yield name, tensor
            continue
        for e in range(tensor.shape[0]):
            t = tensor.narrow(0, e, 1)[0]             # [2I, H] or [H, I]
            if last == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", t
            else:
                i = t.shape[0] // 2
                yield f"{prefix}.{e}.gate_proj.weight", t[:i]
                yield f"{prefix}.{e}.up_proj.weight", t[i:]


class MoEForCausalLM(LlamaForCausalLM):
    """The Llama decoder with a SparseMoeBlock in each layer ModelConfig.is_sparse_layer names
    (a dense LlamaMLP of ``intermediate_size`` elsewhere)."""

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return SparseMoeBlock(config) if config.is_sparse_layer(layer_id) else LlamaMLP(config)

    def _target(self, name: str) -> tuple[str, object]:
        """Mixtral's ``block_sparse_moe`` is this model's ``mlp``; ``...experts.{e}.{proj}.weight``
        goes to FusedMoE's ``w13_weight`` (gate, up) or ``w2_weight`` (down) as shard (e, w1|w3|w2)."""
        parts = ["mlp" if p == "block_sparse_moe" else p for p in name.split(".")]
        if "experts" in parts:
            i = parts.index("experts")
            tail = parts[i + 1:]
            if len(tail) == 3 and tail[0].isdigit() and tail[1] in _EXPERT_PROJ and tail[2] == "weight":
                proj = _EXPERT_PROJ[tail[1]]
                param = "w2_weight" if proj == "w2" else "w13_weight"
                return ".".join(parts[:i + 1] + [param]), (int(tail[0]), proj)
        return super()._target(".".join(parts))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(unfuse_experts(weights))
