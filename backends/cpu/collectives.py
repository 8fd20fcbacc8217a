"""Collectives over torch.distributed, with the platform's backend underneath (gloo on the CPU;
the same code drives nccl/rccl/xccl, which the platform names). Python objects travel over a
gloo group beside it, so broadcasting the batch never goes through device memory."""
from __future__ import annotations

import datetime
from typing import Any, Optional

import torch
import torch.distributed as dist

from hal.collectives import Collectives

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
# torch 2.13 renamed all_gather_into_tensor (older builds, e.g. 2.11, have only the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistributedCollectives(Collectives):
    def __init__(self, *, backend: str, world_size: int, rank: int, init_method: str,
                 group: Optional[Any] = None, timeout: float = 600.0) -> None:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                                    rank=rank, timeout=datetime.timedelta(seconds=timeout))
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.backend = backend
        self.object_group = group if backend == "gloo" else dist.new_group(backend="gloo")

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in _OPS:
            raise ValueError(f"all_reduce: op must be one of {', '.join(_OPS)}, got {op!r}")
        dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        _all_gather_single(out, t, group=self.group)      # one call, rank-major rows
        if dim in (0, -t.dim()):
            return out
        parts = out.chunk(self.world_size, dim=0)
        return torch.cat(parts, dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(t, src=src, group=self.group)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.object_group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.object_group)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
