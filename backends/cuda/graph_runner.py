"""Decode steps as CUDA graphs (HIP graphs on ROCm: its torch exposes the same torch.cuda API).

Everything but the graph object, the memory pool and the capture stream lives in
``hal.graph_runner.GraphRunner``. ``register_for(platform name)`` offers it on a platform.
"""
from __future__ import annotations

from typing import Callable

import torch

from hal.graph_runner import GraphRunner
from hal.registry import register

_platforms: set[str] = set()
# warm-up runs per batch size before its capture: compiles Triton kernels for the shape and lets
# cuBLAS set up its workspace on the capture stream
_WARMUP_RUNS = 2


class CudaGraphRunner(GraphRunner):
    name = "cuda_graph"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._pool = None      # one memory pool shared by every captured batch size
        self._stream = torch.cuda.Stream(device=self.device)

    def _capture_one(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for _ in range(_WARMUP_RUNS):
                fn()
        self._stream.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return graph, out

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


def _factory(**kw) -> CudaGraphRunner:
    return CudaGraphRunner(**kw)


def register_for(platform_name: str) -> None:
    """Offer the graph runner on ``platform_name`` as well (cuda, hip)."""
    _platforms.add(platform_name)
    register("graph_runner", CudaGraphRunner.name, _factory, platforms=tuple(sorted(_platforms)))
