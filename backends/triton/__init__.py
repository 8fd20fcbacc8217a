"""Portable Triton kernels shared by CUDA, ROCm and XPU: paged attention (extend and decode),
the KV store, and the fused layer ops (RMSNorm with residual, SiLU-and-mul, rotary).

A vendor folder that runs them calls ``register_for(its platform name)``. Nothing here imports
triton until a backend is built, so machines without it still load every other backend.
``python -m backends.triton.compile_check`` compiles every kernel for H100 and MI300 without them.
"""
from __future__ import annotations

import functools

from hal.registry import register

_platforms: set[str] = set()
REQUIRES = "triton (pip install triton; ROCm and XPU need their vendor's triton build)"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def _attention(**kw):
    from backends.triton.attention_backend import TritonAttentionBackend

    return TritonAttentionBackend(**kw)


def _layer_ops(**kw):
    from backends.triton.layer_ops import TritonLayerOps

    return TritonLayerOps(**kw)


def register_for(platform_name: str) -> None:
    """Offer the Triton attention backend and layer ops on ``platform_name`` as well."""
    _platforms.add(platform_name)
    platforms = tuple(sorted(_platforms))
    register("attention", "triton", _attention, platforms=platforms, available=triton_available,
             requires=REQUIRES, features=("fp8_kv_cache", "sliding_window"))
    register("layer_ops", "triton", _layer_ops, platforms=platforms, available=triton_available,
             requires=REQUIRES)
