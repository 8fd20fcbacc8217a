"""Gemma 3 (text only, ``Gemma3ForCausalLM``): a decoder of its own beside Llama's. Embeddings are
scaled by sqrt(hidden_size); Gemma's RMSNorm (scale 1 + w, in fp32) sits before and after both the
attention and the MLP ("sandwich" norms) and on each head of q and k; the MLP is GeGLU (tanh GELU);
q.k is scaled by query_pre_attn_scalar ** -0.5; sliding-window layers rotate with their own (local)
RoPE, full layers with the global one. Weight loading and logits (tied embeddings) are Llama's."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention import Attention
from engine.layers.layernorm import GemmaRMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.ops import get_layer_ops
from engine.layers.rotary import QKRotary, RotaryEmbedding, get_rope
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig
from engine.models.llama import CosSin, LlamaForCausalLM


class Gemma3MLP(nn.Module):
    """down(gelu_tanh(gate) * up). The activation is applied by the layer ops before the down
    projection (whose fused ``silu_mul_input`` is SiLU's); with tensor parallelism each rank holds
    a slice of gate and up and the down projection all-reduces."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size] * 2, bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)
        self.layer_ops = get_layer_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] (already normed) -> [T, hidden]."""
        return self.down_proj(self.layer_ops.gelu_tanh_and_mul(self.gate_up_proj(x)))  # [T, I / tp] inside


class Gemma3Attention(nn.Module):
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
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        scale = config.attention_scale if config.attention_scale is not None else d ** -0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, scale, layer_id,
                              sliding_window=config.sliding_window_of(layer_id))
        self.rotary = QKRotary()

    def forward(self, x: torch.Tensor, cos_sin: CosSin, forward_batch) -> torch.Tensor:
        """x: [T, hidden] (already normed) -> the o projection's output [T, hidden] (reduced)."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))      # [T, num_heads, head_dim]
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))   # [T, num_kv_heads, head_dim]
        return self.o_proj(self.attn(q, k, v, forward_batch, rotary=(self.rotary, *cos_sin)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_id)
        self.mlp = Gemma3MLP(config)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.is_sliding = config.sliding_window_of(layer_id) is not None

    def forward(self, x: torch.Tensor, cos_sin: CosSin, forward_batch) -> torch.Tensor:
        """The residual stream x [T, hidden] -> after this layer; each residual add is in x's dtype,
        of the sublayer's output after its post-norm."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, forward_batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.hidden_size = config.hidden_size
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config.head_dim, config)               # the full-attention layers'
        if config.sliding_rope_theta is None:
            self.sliding_rotary_emb = self.rotary_emb
        else:
            self.sliding_rotary_emb = RotaryEmbedding(config.head_dim, max(config.context_len, 1),
                                                      config.sliding_rope_theta, config.sliding_rope_scaling,
                                                      config.max_position_embeddings)
        self._embed_scales: dict[torch.dtype, float] = {}

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to ``dtype`` (bf16: sqrt(1152) = 33.94 becomes 34.0), as the
        reference multiplies by it in the weights' dtype; the product is then rounded once more."""
        if dtype not in self._embed_scales:
            self._embed_scales[dtype] = float(torch.tensor(self.hidden_size ** 0.5, dtype=torch.float32).to(dtype))
        return self._embed_scales[dtype]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                              # [T, hidden_size]
        hidden = hidden * self.embed_scale(hidden.dtype)
        # once per step, each shared by the layers of its kind
        full = self.rotary_emb.cos_sin(positions, hidden.dtype)
        sliding = self.sliding_rotary_emb.cos_sin(positions, hidden.dtype) \
            if self.sliding_rotary_emb is not self.rotary_emb else full
        for layer in self.layers:
            hidden = layer(hidden, sliding if layer.is_sliding else full, forward_batch)
        return self.norm(hidden)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's stack with Llama's weight loading (the same checkpoint names: q/k/v and gate/up are
    fused the same way; Gemma's norm weights load as they are, 1 + w applied by the norm), logits and
    embedding tying."""

    def make_model(self, config: ModelConfig) -> nn.Module:
        return Gemma3Model(config)
