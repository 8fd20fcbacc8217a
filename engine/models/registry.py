"""Architecture name (config.json ``architectures``) -> model class."""
from __future__ import annotations

import importlib

from torch import nn

from engine.models.config import SUPPORTED_ARCHITECTURES, UnsupportedModelError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("engine.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Gemma3ForCausalLM": ("engine.models.gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("engine.models.phi3", "Phi3ForCausalLM"),
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(arch: str) -> type[nn.Module]:
    if arch not in _MODELS:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
