"""ModelConfig: what the engine needs from a Hugging Face checkpoint's config.json.

Reads ``config.json`` (and ``generation_config.json`` for EOS ids) once and resolves the
dtype, the context length, the RoPE parameters and each layer's sliding window, so nothing
downstream parses HF dicts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

# config.json "architectures" names served; the registry maps them to classes.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                           "Qwen3MoeForCausalLM", "Gemma3ForCausalLM",
                           "Phi3ForCausalLM")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "phi3": "Phi3ForCausalLM"}
# architectures (or bare model types) that look close to a served one, with what to do instead
_NOT_SERVED = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 (gemma-3-4b-it and larger) is not supported; "
                                      "only its text-only form, Gemma3ForCausalLM (model_type gemma3_text, "
                                      "e.g. gemma-3-1b-it), is",
    "gemma3": "the multimodal Gemma 3 (model_type gemma3) is not supported; only Gemma3ForCausalLM "
              "(model_type gemma3_text, e.g. gemma-3-1b-it) is",
}
_GEMMA3 = "Gemma3ForCausalLM"
# each architecture's MLP activation (config.json hidden_act, or Gemma's hidden_activation); others: silu
_ACTIVATION = {_GEMMA3: "gelu_pytorch_tanh"}
_MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# sliding windows (_layer_sliding_windows): architectures whose every layer uses config.json's
# sliding_window when it is set, and those that never use one; the others follow Qwen2's rule
_WINDOW_EVERY_LAYER = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")
_WINDOW_EVERY_LAYER_WHEN_USED = ("Qwen3MoeForCausalLM",)     # with use_sliding_window
_NO_WINDOW = ("LlamaForCausalLM",)
_WINDOW_BY_LAYER_TYPES = (_GEMMA3,)   # layer_types (or sliding_window_pattern), no use_sliding_window
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or an option of it is not implemented."""


@dataclass
class ModelConfig:
    path: str
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]   # None, or the HF dict with "rope_type" set
    max_position_embeddings: int
    context_len: int                         # what the server admits (prompt + output)
    dtype: torch.dtype
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                    # Qwen3, Gemma 3: RMSNorm over head_dim of q and k
    hidden_act: str = "silu"                 # the MLP's gate activation (Gemma 3: gelu_pytorch_tanh)
    attention_scale: Optional[float] = None  # multiplies q.k; None: head_dim ** -0.5 (Gemma 3:
                                             # query_pre_attn_scalar ** -0.5)
    # Gemma 3: the sliding-window layers' own RoPE (rope_local_base_freq, no scaling), while the
    # full layers use rope_theta and rope_scaling; None: every layer uses the latter
    sliding_rope_theta: Optional[float] = None
    sliding_rope_scaling: Optional[dict[str, Any]] = None
    partial_rotary_factor: float = 1.0       # Phi-4-mini: 0.75, only the first rotary_dim of each head rotates
    # per layer: its sliding window W (a query at position p attends to keys p - W < j <= p), or
    # None for full attention; empty: every layer full
    layer_sliding_windows: tuple[Optional[int], ...] = ()
    # mixture of experts (0 experts: a dense model); see _moe_fields
    num_experts: int = 0                     # routed experts of a sparse layer (Mixtral: num_local_experts)
    num_experts_per_tok: int = 0             # top-k
    moe_intermediate_size: int = 0           # each routed expert's intermediate size
    norm_topk_prob: bool = False             # renormalize the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token goes through (0: none)
    decoder_sparse_step: int = 1             # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer_id: int) -> bool:
        """Whether decoder layer ``layer_id`` has a routed-experts MLP (else a dense one of
        ``intermediate_size``)."""
        return (self.is_moe and layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each q/k head rotate (transformers: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def sliding_window_of(self, layer_id: int) -> Optional[int]:
        """Layer ``layer_id``'s sliding window, or None (full attention)."""
        return self.layer_sliding_windows[layer_id] if self.layer_sliding_windows else None

    @property
    def sliding_windows(self) -> tuple[int, ...]:
        """The distinct sliding windows of the model's layers, ascending (empty: none)."""
        return tuple(sorted({w for w in self.layer_sliding_windows if w is not None}))

    def num_heads_per_rank(self, tp_size: int) -> int:
        if self.num_attention_heads % tp_size:
            raise ValueError(f"--tp-size {tp_size} must divide the model's {self.num_attention_heads} attention heads")
        return self.num_attention_heads // tp_size

    def num_kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads are split when there are enough, else replicated (each rank keeps one)."""
        kv = self.num_key_value_heads
        if kv >= tp_size:
            if kv % tp_size:
                raise ValueError(f"--tp-size {tp_size} must divide the model's {kv} KV heads")
            return kv // tp_size
        if tp_size % kv:
            raise ValueError(f"the model's {kv} KV heads must divide --tp-size {tp_size}")
        return 1

    @classmethod
    def from_pretrained(cls, path: str, *, context_length: Optional[int] = None, dtype: str = "auto",
                        platform_dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES,
                        platform_default: torch.dtype = torch.float32) -> "ModelConfig":
        hf = _read_json(path, "config.json", required=True)
        arch = _architecture(hf, path)
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        act = _activation(hf, arch, path)
        max_pos = int(hf.get("max_position_embeddings") or 2048)
        rope_theta, rope_scaling = _rope(_phi3_rope_view(hf) if arch == "Phi3ForCausalLM" else hf, max_pos,
                                         default_theta=1e6 if arch == _GEMMA3 else 10000.0)
        num_layers = int(hf["num_hidden_layers"])
        windows = _layer_sliding_windows(hf, arch, num_layers)
        qwen2 = arch == "Qwen2ForCausalLM"
        qwen2_moe = arch == "Qwen2MoeForCausalLM"   # q/k/v bias unless config.json says qkv_bias: false
        attention_bias = bool(hf.get("attention_bias", False))
        cfg = cls(
            path=path, architecture=arch, model_type=hf.get("model_type", ""),
            hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            intermediate_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_position_embeddings=max_pos,
            context_len=_context_len(context_length, max_pos),
            dtype=_resolve_dtype(dtype, hf, platform_dtypes, platform_default),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == _GEMMA3)),  # Gemma's configs omit it
            qkv_bias=True if qwen2 else bool(hf.get("qkv_bias", True)) if qwen2_moe else attention_bias,
            o_proj_bias=False if qwen2 or qwen2_moe else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", _GEMMA3), layer_sliding_windows=windows,
            partial_rotary_factor=_partial_rotary_factor(hf, arch, head_dim), hidden_act=act, **_moe_fields(hf, arch, path), **_gemma3_fields(hf, arch, path, max_pos),
            eos_token_ids=_eos_ids(path, hf), bos_token_id=hf.get("bos_token_id"), hf_config=hf)
        # a window at least as long as the context masks nothing (Phi-3.5-mini's 262,144): full
        # attention, so those layers keep the plain kernels
        windows = tuple(w if w is not None and w < cfg.context_len else None for w in cfg.layer_sliding_windows)
        cfg.layer_sliding_windows = windows if any(w is not None for w in windows) else ()
        return cfg


def _read_json(path: str, name: str, required: bool = False) -> Optional[dict]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{file} not found: --model-path must be a folder holding a "
                                    f"Hugging Face checkpoint (config.json and *.safetensors)")
        return None
    with open(file) as f:
        return json.load(f)


def _architecture(hf: dict, path: str) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:  # some configs name only the family
        return _BY_MODEL_TYPE[hf["model_type"]]
    for name in [*archs, hf.get("model_type")]:
        if name in _NOT_SERVED:
            raise UnsupportedModelError(f"{path}: {_NOT_SERVED[name]}")
    raise UnsupportedModelError(
        f"{path}: architecture {archs or hf.get('model_type')!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _activation(hf: dict, arch: str, path: str) -> str:
    """The MLP's activation, checked against the one the architecture's model implements."""
    expected = _ACTIVATION.get(arch, "silu")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or expected
    if act != expected:
        raise UnsupportedModelError(f"{path}: hidden activation {act!r} is not supported for {arch} "
                                    f"(only {expected})")
    return act


def _gemma3_fields(hf: dict, arch: str, path: str, max_pos: int) -> dict[str, Any]:
    """Gemma 3's ModelConfig fields ({} for other architectures): the attention scale from
    ``query_pre_attn_scalar`` and the sliding layers' RoPE. Gemma 2's logit soft-capping and
    EmbeddingGemma's bidirectional attention are refused rather than ignored."""
    if arch != _GEMMA3:
        return {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise UnsupportedModelError(f"{path}: {key}={hf[key]} is not supported (Gemma 3 has no logit "
                                        f"soft-capping; Gemma 2 is not served); set it to null")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{path}: use_bidirectional_attention is not supported (decoder models "
                                    f"attend causally)")
    local = (hf.get("rope_parameters") or {}).get("sliding_attention")
    theta, scaling = _rope({"rope_parameters": local or {}}, max_pos,
                           default_theta=float(hf.get("rope_local_base_freq", 10000.0)))
    return dict(attention_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                sliding_rope_theta=theta, sliding_rope_scaling=scaling)


def _moe_fields(hf: dict, arch: str, path: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from config.json ({} for a dense architecture).
    Mixtral: every layer sparse, ``intermediate_size`` per expert, top-k always renormalized.
    Qwen2/3-MoE: ``moe_intermediate_size`` per expert, renormalized when ``norm_topk_prob``,
    ``decoder_sparse_step`` and ``mlp_only_layers`` choose the sparse layers. transformers 5
    writes Qwen3-MoE's ``num_experts`` as ``num_local_experts``; either is read."""
    if arch not in _MOE_ARCHITECTURES:
        return {}
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    top_k = int(hf.get("num_experts_per_tok") or 0)
    if arch == "MixtralForCausalLM":
        fields = dict(moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)
    else:
        fields = dict(moe_intermediate_size=int(hf["moe_intermediate_size"]),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
                      mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []])
        if arch == "Qwen2MoeForCausalLM":
            fields["shared_expert_intermediate_size"] = int(hf.get("shared_expert_intermediate_size") or 0)
    if experts > 0 and not 1 <= top_k <= experts:
        raise UnsupportedModelError(f"{path}: num_experts_per_tok must be in [1, {experts}] (the number of "
                                    f"experts), got {top_k}")
    if arch == "MixtralForCausalLM" and experts < 1:
        raise UnsupportedModelError(f"{path}: a Mixtral config needs num_local_experts >= 1, got {experts}")
    return dict(fields, num_experts=experts, num_experts_per_tok=top_k)


def _rope(hf: dict, max_pos: int, default_theta: float = 10000.0) -> tuple[float, Optional[dict]]:
    """(theta, scaling). transformers 5 writes ``rope_parameters`` (theta inside; for Gemma 3 one
    dict per layer type, of which the full layers' is read here); 4.x wrote ``rope_theta`` plus
    ``rope_scaling`` (with ``type`` or ``rope_type``)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"] or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("type", None)
    rope_type = scaling.get("rope_type", rope_type) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn", "longrope"):
        scaling.setdefault("original_max_position_embeddings", max_pos)
    if rope_type == "longrope":
        _check_longrope(scaling)
    return theta, scaling


def _phi3_rope_view(hf: dict) -> dict:
    """config.json as transformers' Phi3Config reads its rope: the rope types "su" and "yarn" (early
    Phi-3 configs) mean longrope, and the top-level ``original_max_position_embeddings`` (4096 when
    absent) overrides any inside the rope dict."""
    hf = dict(hf)
    for key in ("rope_scaling", "rope_parameters"):
        rope = dict(hf.get(key) or {})
        if rope.get("rope_type", rope.get("type")) in ("su", "yarn", "longrope"):
            rope.pop("type", None)
            rope["rope_type"] = "longrope"
            rope["original_max_position_embeddings"] = int(hf.get("original_max_position_embeddings") or 4096)
            hf[key] = rope
    return hf


def _check_longrope(scaling: dict) -> None:
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or not factors:
            raise UnsupportedModelError(f"longrope needs rope_scaling {key} (a list of rotary_dim / 2 numbers), "
                                        f"got {factors!r}")


def _partial_rotary_factor(hf: dict, arch: str, head_dim: int) -> float:
    """The fraction of each head that rotates: Phi-3's ``partial_rotary_factor`` (in the rope dict or
    top-level, as transformers reads it); 1 for the other families, whose transformers models rotate
    whole heads."""
    if arch != "Phi3ForCausalLM":
        return 1.0
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * factor)
    if not 0.0 < factor <= 1.0 or dim < 2 or dim % 2:
        raise UnsupportedModelError(f"partial_rotary_factor {factor} gives {dim} rotary dims of the head's "
                                    f"{head_dim}; it must give an even number >= 2")
    return factor


def _layer_sliding_windows(hf: dict, arch: str, num_layers: int) -> tuple[Optional[int], ...]:
    """Each layer's sliding window (None: full attention) as transformers reads the config:
    Mistral, Mixtral and Phi-3 window every layer with ``sliding_window`` (and ignore ``layer_types``);
    the Qwen families only with ``use_sliding_window``, and then Qwen3-MoE every layer, the others
    the layers that ``layer_types`` calls "sliding_attention" (without ``layer_types``: Qwen2 and
    Qwen3 layers ``max_window_layers`` and up, Qwen2-MoE the even layers below it); Gemma 3 always
    by ``layer_types`` (without it: every ``sliding_window_pattern``-th layer full, default 6);
    Llama never."""
    window = hf.get("sliding_window")
    if window is None or arch in _NO_WINDOW:
        return ()
    every_layer = arch in _WINDOW_EVERY_LAYER
    by_types = arch in _WINDOW_BY_LAYER_TYPES
    if not every_layer and not by_types and not hf.get("use_sliding_window", False):
        return ()  # Qwen configs carry a window they only use with use_sliding_window
    window = int(window)
    if window < 1:
        raise UnsupportedModelError(f"sliding_window must be >= 1, got {window}")
    if every_layer or arch in _WINDOW_EVERY_LAYER_WHEN_USED:
        return (window,) * num_layers
    types = hf.get("layer_types")
    if types is None and by_types:
        pattern = int(hf.get("sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if types is None:
        first = int(hf.get("max_window_layers", 28))
        if arch == "Qwen2MoeForCausalLM":
            windowed = [i % 2 == 0 and i < first for i in range(num_layers)]
        else:
            windowed = [i >= first for i in range(num_layers)]
        types = ["sliding_attention" if w else "full_attention" for w in windowed]
    if len(types) != num_layers:
        raise UnsupportedModelError(f"layer_types names {len(types)} layers, the model has {num_layers}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def _context_len(requested: Optional[int], max_pos: int) -> int:
    if requested and requested > max_pos:
        logger.warning("context length %d exceeds the model's max_position_embeddings %d; outputs past "
                       "%d tokens may be poor", requested, max_pos, max_pos)
    return requested or max_pos


def _resolve_dtype(requested: str, hf: dict, platform_dtypes: tuple[torch.dtype, ...],
                   platform_default: torch.dtype) -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(_DTYPES)}, got {requested!r}")
        dt = _DTYPES[requested]
        if dt not in platform_dtypes:
            raise ValueError(f"--dtype {requested} is not supported on this device; supported: "
                             f"{', '.join(str(d).replace('torch.', '') for d in platform_dtypes)}")
        return dt
    name = hf.get("torch_dtype") or hf.get("dtype")
    dt = _DTYPES.get(str(name).replace("torch.", "")) if name else None
    if dt is not None and dt in platform_dtypes:
        return dt
    return platform_default


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(path: str, hf: dict) -> list[int]:
    gen = _read_json(path, "generation_config.json") or {}
    return _as_ids(gen.get("eos_token_id")) or _as_ids(hf.get("eos_token_id"))


def read_vocab_size(path: str) -> int:
    """The checkpoint's vocabulary size, without building a ModelConfig."""
    hf = _read_json(path, "config.json", required=True)
    return int(hf.get("vocab_size") or hf.get("text_config", {}).get("vocab_size"))
