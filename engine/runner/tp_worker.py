"""Tensor parallelism: joining the group, and the loop of every rank but 0.

Rank 0 runs the scheduler. Before each forward pass its ModelRunner broadcasts a ``TPStep``:
the batch (host copies of the ForwardBatch) and the req_to_token writes made since the last
step. The other ranks apply the writes and run the same forward pass on their shard of the
weights; the model's all-reduce and all-gather meet rank 0's inside it. Only rank 0 samples
(every rank holds the same gathered logits). The KV pool is sized by the smallest rank.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

import torch

import hal
from engine.layers.parallel_state import set_tp
from engine.runner.forward_batch import ForwardBatch, ForwardMode
from hal.collectives import Collectives, SingleProcessCollectives

if TYPE_CHECKING:
    from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)

# ForwardBatch fields that travel; attn_backend is each rank's own, prompt_logprobs an output.
_BATCH_FIELDS = tuple(f.name for f in fields(ForwardBatch)
                      if f.name not in ("attn_backend", "host_tensors", "prompt_logprobs", "piecewise"))


@dataclass
class TPStep:
    journal: list                       # ReqToTokenPool writes since the last step
    batch: Optional[dict[str, Any]]     # the ForwardBatch on the host; None: the ranks stop


def ranks_per_node(args: "ServerArgs") -> int:
    return args.tp_size // args.nnodes


def local_device_index(args: "ServerArgs", tp_rank: int) -> int:
    return args.base_gpu_id + tp_rank % ranks_per_node(args)


def init_tensor_parallel(args: "ServerArgs", platform: hal.Platform, tp_rank: int) -> Collectives:
    """Join the tensor-parallel group (every rank calls this) and make it the layers' default."""
    if args.tp_size == 1:
        set_tp(0, 1)
        return SingleProcessCollectives()
    if not args.dist_init_addr:
        raise ValueError("--tp-size > 1 needs --dist-init-addr (the launcher picks a local one)")
    if platform.uses_host_memory:
        # Ranks of one machine share its cores: split them rather than oversubscribe.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node(args)))
    entry, _ = hal.select("collectives", platform, "torch_distributed")
    start = time.perf_counter()
    coll = entry.factory(backend=platform.dist_backend, world_size=args.tp_size, rank=tp_rank,
                         init_method=f"tcp://{args.dist_init_addr}", timeout=args.dist_timeout)
    set_tp(tp_rank, args.tp_size, coll)
    logger.info("tensor parallel: rank %d of %d joined over %s (%s) in %.1f s", tp_rank, args.tp_size,
                platform.dist_backend, args.dist_init_addr, time.perf_counter() - start)
    return coll


def batch_to_host(batch: ForwardBatch) -> dict[str, Any]:
    """The batch's fields on the host: its host copies where the scheduler kept them (no device
    read, which would wait for the step in flight)."""
    out = {}
    for name in _BATCH_FIELDS:
        v = batch.host_tensors.get(name, getattr(batch, name))
        out[name] = v.cpu() if isinstance(v, torch.Tensor) else v
    return out


def batch_from_host(fields_: dict[str, Any], device: torch.device) -> ForwardBatch:
    kw = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
          for k, v in fields_.items()}
    assert isinstance(kw["mode"], ForwardMode)
    return ForwardBatch(**kw)


def run_tp_worker(args: "ServerArgs", tp_rank: int, parent_pid: Optional[int] = None) -> None:
    """A rank > 0: load the shard, then run every batch rank 0 sends until it says stop."""
    from engine.runner.model_runner import ModelRunner

    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    runner = ModelRunner(args, tp_rank=tp_rank)
    logger.info("tensor-parallel rank %d ready: %s", tp_rank, runner.describe())
    runner.serve_rank0()


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                logger.error("the launching process is gone; tensor-parallel rank exits")
                os._exit(1)

    threading.Thread(target=watch, name="anyserve-parent-watch", daemon=True).start()
