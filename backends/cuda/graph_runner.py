"""Decode steps as CUDA graphs, and extend steps as pieces of CUDA graphs around the attention
(HIP graphs on ROCm: its torch exposes the same torch.cuda API).

Everything but the graph object, the memory pool and the capture stream lives in
``hal.graph_runner.GraphRunner`` and ``hal.piecewise_graph.PiecewiseGraphRunner``.
``register_for(platform name)`` offers both on a platform.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from hal.graph_runner import GraphRunner
from hal.piecewise_graph import PiecewiseGraphRunner
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


class CudaPiecewiseGraphRunner(PiecewiseGraphRunner):
    name = "cuda_piecewise"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._pool = torch.cuda.graph_pool_handle()   # shared by every piece of every token count
        self._stream = torch.cuda.Stream(device=self.device)

    @contextmanager
    def _capture_stream(self) -> Iterator[None]:
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _begin_piece(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool)
        return graph

    def _end_piece(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.capture_end()

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


def _factory(**kw) -> CudaGraphRunner:
    return CudaGraphRunner(**kw)


def _piecewise_factory(**kw) -> CudaPiecewiseGraphRunner:
    return CudaPiecewiseGraphRunner(**kw)


def register_for(platform_name: str) -> None:
    """Offer the graph runners on ``platform_name`` as well (cuda, hip)."""
    _platforms.add(platform_name)
    platforms = tuple(sorted(_platforms))
    register("graph_runner", CudaGraphRunner.name, _factory, platforms=platforms)
    register("piecewise_graph_runner", CudaPiecewiseGraphRunner.name, _piecewise_factory, platforms=platforms)
