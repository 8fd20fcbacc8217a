"""Collectives over torch.distributed, with the platform's backend underneath (gloo on the CPU;
the same code drives nccl/rccl/xccl, which the platform names)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from hal.collectives import Collectives


class TorchDistributedCollectives(Collectives):
    def __init__(self, *, backend: str, world_size: int, rank: int, init_method: str,
                 group: Optional[Any] = None) -> None:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                                    rank=rank)
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.backend = backend

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
