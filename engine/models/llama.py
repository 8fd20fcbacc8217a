"""Llama: the decoder the other families reuse. Options come from ModelConfig (qkv/o bias,
per-head q/k RMSNorm, tied embeddings), so Mistral, Qwen2 and Qwen3 only subclass it; the
mixture-of-experts families choose each layer's MLP through ``make_mlp``."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from engine.layers.attention import Attention
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.logits import LogitsProcessor
from engine.layers.rotary import QKRotary, get_rope
from engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from engine.models.config import ModelConfig

logger = logging.getLogger(__name__)

CosSin = tuple[torch.Tensor, torch.Tensor]


class LlamaMLP(nn.Module):
    """The dense SiLU-gated MLP, of ``config.intermediate_size`` unless ``intermediate_size`` says
    otherwise (a MoE model's dense layers and shared expert). reduce_results=False leaves the down
    projection's partial sums for the caller to all-reduce."""

    def __init__(self, config: ModelConfig, intermediate_size: Optional[int] = None,
                 reduce_results: bool = True) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size] * 2, bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias,
                                           reduce_results=reduce_results)

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """x + mlp(norm(x)) for the residual stream x: the norm inside the gate/up projection,
        SiLU-and-mul of [gate | up] and the residual add inside the down projection, where the
        layer ops fuse them."""
        return self.down_proj(self.gate_up_proj.forward_normed(x, norm), silu_mul_input=True, residual=x)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size,
                                        bias=config.o_proj_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.split_sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d ** -0.5, layer_id,
                              sliding_window=config.sliding_window_of(layer_id))
        self.rotary = QKRotary(config.rotary_dim)
        # the backends' fused rotary turns whole heads: with partial rotary the layer rotates first
        self.rotate_before_attention = config.rotary_dim != d

    def forward(self, x: torch.Tensor, norm: nn.Module, cos_sin: CosSin, forward_batch) -> torch.Tensor:
        """x + attention(norm(x)) for the residual stream x: the norm inside the q/k/v projection
        and the residual add inside the o projection, where the layer ops fuse them."""
        t = x.shape[0]
        q, k, v = self.qkv_proj.forward_normed(x, norm).split(self.split_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)     # [T, num_heads, head_dim]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, num_kv_heads, head_dim]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # rotated inside the attention backend's kernels where it can, else by self.rotary first
        rotary = (self.rotary, *cos_sin)
        if self.rotate_before_attention:
            q, k = self.rotary(q, k, *cos_sin)
            rotary = None
        return self.o_proj(self.attn(q, k, v, forward_batch, rotary=rotary), residual=x)


MLPFactory = Callable[[ModelConfig, int], nn.Module]


class LlamaDecoderLayer(nn.Module):
    """``mlp``: any module whose ``forward(x, norm)`` returns x + mlp(norm(x)) (LlamaMLP, or a
    sparse MoE block)."""

    def __init__(self, config: ModelConfig, layer_id: int, mlp: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id)
        self.mlp = mlp if mlp is not None else LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, forward_batch) -> torch.Tensor:
        """The residual stream x [T, hidden] -> after this layer. Each norm is done by the
        projection that reads it and each residual add by the projection before it, so at batch 1
        the layer is four GEMVs and the attention kernels."""
        x = self.self_attn(x, self.input_layernorm, cos_sin, forward_batch)
        return self.mlp(x, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_mlp: Optional[MLPFactory] = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, make_mlp(config, i) if make_mlp is not None else None)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config.head_dim, config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden_size]
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)  # once per step, shared by all layers
        for layer in self.layers:
            hidden = layer(hidden, cos_sin, forward_batch)
        return self.norm(hidden)


def _plain_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """For parameters no parallel layer owns (RMSNorm weights): same shape, copied whole."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)} but the model expects "
                         f"{tuple(param.shape)}; does config.json match the weights?")
    param.data.copy_(loaded)


# checkpoint name fragment -> (fused parameter fragment, shard id)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.make_model(config)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def make_model(self, config: ModelConfig) -> nn.Module:
        """The decoder stack (``self.model``: embeddings, layers, final norm); families with a
        stack of their own (Gemma 3) override it and keep this class's loading and logits."""
        return LlamaModel(config, self.make_mlp)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        """The MLP of decoder layer ``layer_id``; mixture-of-experts families override it."""
        return LlamaMLP(config)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        """input_ids, positions: [T] -> fp32 logits [num_logits, vocab_size]."""
        return self.compute_logits(self.model(input_ids, positions, forward_batch), forward_batch)

    def compute_logits(self, hidden: torch.Tensor, forward_batch) -> torch.Tensor:
        """The decoder stack's output [T, hidden] -> fp32 logits (and prompt logprobs) for the
        batch's rows; a piecewise graph runner calls it on the stack's captured output."""
        return self.logits_processor(hidden, self.lm_head, forward_batch)

    def weight_needed(self, name: str) -> bool:
        """False for checkpoint tensors the model never uses (the loader skips reading them)."""
        if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
            return False
        return not (self.config.tie_word_embeddings and name == "lm_head.weight")

    def _target(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (parameter name in this model, shard id or None)."""
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in STACKED_PARAMS:
                fused, shard = STACKED_PARAMS[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
        return name, None

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face tensors into this model's (fused, sharded) parameters.

        Returns the names of the parameters that are now fully loaded (every shard of a fused
        one); the caller compares them with ``named_parameters()`` to report missing weights.
        """
        params = dict(self.named_parameters())
        shards_done: dict[str, set] = {}
        unknown: list[str] = []
        for name, tensor in weights:
            if not self.weight_needed(name):
                continue
            target, shard = self._target(name)
            param = params.get(target)
            if param is None:
                unknown.append(name)
                continue
            loader = getattr(param, "weight_loader", _plain_loader)
            try:
                loader(param, tensor, shard)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            shards_done.setdefault(target, set()).add(shard)
        if unknown:
            logger.warning("ignored %d checkpoint tensor(s) this model has no parameter for, e.g. %s",
                           len(unknown), ", ".join(unknown[:3]))
        # shard None of a fused parameter is its checkpoint tensor with every shard stacked (Phi-3's qkv_proj)
        return {t for t, done in shards_done.items() if None in done or done >= self._shards_of(t)}

    def _shards_of(self, param_name: str) -> set:
        module = self.get_submodule(param_name.rsplit(".", 1)[0])
        if hasattr(module, "shard_ids_of"):  # shards differ by parameter (FusedMoE's experts)
            return set(module.shard_ids_of(self.get_parameter(param_name)))
        return set(getattr(module, "shard_ids", (None,)))
