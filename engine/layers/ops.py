"""The layer ops (RMSNorm, SiLU-and-mul, rotary) that layers built from now on will use.

The ModelRunner sets the HAL's selection before it builds the model; each layer takes it once,
at construction. Until then the torch implementation is used.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from hal.layer_ops import LayerOps

_layer_ops: Optional[LayerOps] = None


def set_layer_ops(impl: LayerOps) -> None:
    global _layer_ops
    _layer_ops = impl


def get_layer_ops() -> LayerOps:
    global _layer_ops
    if _layer_ops is None:
        from hal.registry import entries

        _layer_ops = entries("layer_ops")["torch"].factory()
    return _layer_ops


@contextlib.contextmanager
def using_layer_ops(impl: LayerOps) -> Iterator[LayerOps]:
    """Build layers with ``impl`` inside the block (tests, benchmarks), then restore."""
    global _layer_ops
    old = _layer_ops
    _layer_ops = impl
    try:
        yield impl
    finally:
        _layer_ops = old
