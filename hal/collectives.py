"""The collectives role: all-reduce, all-gather, broadcast and barrier over a process group.

Tensor collectives run on the device's own library (NCCL, RCCL, XCCL, gloo); ``broadcast_object``
carries small Python objects (the scheduler's batch for the other ranks) over a host group.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Collectives(ABC):
    world_size: int = 1
    rank: int = 0

    @abstractmethod
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over every rank; ``op`` is sum, min or max. Returns ``t``."""

    @abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank's ``t`` becomes rank ``src``'s. Returns ``t``."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    @abstractmethod
    def barrier(self) -> None: ...


class SingleProcessCollectives(Collectives):
    """World of one: every collective is the identity."""

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass
