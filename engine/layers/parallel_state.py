"""Tensor-parallel state of this process: rank, world size and the collectives between ranks.

Set once per scheduler process (``set_tp``) before the model is built; layers read it as
their default ``tp_rank``/``tp_size``.
"""
from __future__ import annotations

from typing import Optional

from hal.collectives import Collectives, SingleProcessCollectives

_tp_rank: int = 0
_tp_size: int = 1
_collectives: Collectives = SingleProcessCollectives()


def set_tp(rank: int, size: int, collectives: Optional[Collectives] = None) -> None:
    global _tp_rank, _tp_size, _collectives
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank must be in [0, {size}), got {rank}")
    if size > 1 and collectives is None:
        raise ValueError(f"tensor-parallel size {size} needs a collectives object")
    _tp_rank, _tp_size = rank, size
    _collectives = collectives or SingleProcessCollectives()


def get_tp_rank() -> int:
    return _tp_rank


def get_tp_size() -> int:
    return _tp_size


def get_tp_collectives() -> Collectives:
    return _collectives
