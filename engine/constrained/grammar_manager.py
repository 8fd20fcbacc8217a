"""The scheduler's side of constrained decoding: compile each request's grammar off the
scheduling loop, attach a matcher when it is ready, and build every step's vocab mask.

Compiled grammars are cached by (kind, text) as futures, so identical constraints (n > 1, a
popular schema) compile once even when they arrive together; failures are cached as well.
The compile thread ends when the manager is dropped (or at shutdown()).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

import torch

from engine.constrained.base import GrammarBackend, GrammarKey
from engine.constrained.bitmask import unpack_bitmask

if TYPE_CHECKING:
    from engine.scheduler.req import Req

logger = logging.getLogger(__name__)

_CACHE_SIZE = 512


class GrammarManager:
    def __init__(self, backend: GrammarBackend, max_batch_size: int, workers: int = 1,
                 cache_size: int = _CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarKey, cf.Future] = OrderedDict()
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anyserve-grammar")
        self._bitmask = backend.allocate_bitmask(max(1, max_batch_size))   # [B, ceil(V'/32)] int32
        self.num_compiles = 0

    # -- compilation -------------------------------------------------------------------------
    def submit(self, req: "Req", key: GrammarKey) -> None:
        """Start (or reuse) the compile of key; the request waits until poll() sees it done."""
        fut = self._cache.get(key)
        if fut is None:
            fut = self._pool.submit(self._compile, key)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        req.grammar_future = fut

    def _compile(self, key: GrammarKey) -> Any:
        start = time.perf_counter()
        try:
            return self.backend.compile(key)
        finally:
            self.num_compiles += 1
            logger.debug("compiled %s grammar (%d chars) in %.1f ms", key.kind, len(key.text),
                         (time.perf_counter() - start) * 1e3)

    @staticmethod
    def is_waiting(req: "Req") -> bool:
        return req.grammar_future is not None

    def poll(self, reqs: list["Req"]) -> list["Req"]:
        """Give a matcher to each request whose compile finished. Returns the requests whose
        compile failed, finished with an abort that carries status 400 and the message."""
        failed = []
        for r in reqs:
            fut = r.grammar_future
            if fut is None or not fut.done():
                continue
            r.grammar_future = None
            err = fut.exception()
            if err is None:
                r.grammar = self.backend.new_matcher(fut.result())
            else:
                r.finished_reason = {"type": "abort", "message": str(err), "status_code": 400}
                failed.append(r)
        return failed

    @staticmethod
    def wait(reqs: list["Req"], timeout: float) -> None:
        """Block up to timeout seconds until one of these requests' compiles finishes."""
        futs = [r.grammar_future for r in reqs if r.grammar_future is not None]
        if futs:
            cf.wait(futs, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    # -- decoding ----------------------------------------------------------------------------
    def vocab_mask(self, reqs: list["Req"], device: torch.device
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The batch's grammar mask: (mask [R, V'] bool on device, rows [R] int64 or None when
        every row is constrained), or (None, None) when no request is. Runs on the CPU; call
        it while the device computes the step's logits. A request that finished after its step
        was launched (the overlap scheduler) is left unconstrained: its token is dropped."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished]
        if not rows:
            return None, None
        if len(rows) > self._bitmask.shape[0]:
            self._bitmask = self.backend.allocate_bitmask(len(rows))
        bitmask = self._bitmask[: len(rows)]
        self.backend.fill_bitmask([reqs[i].grammar for i in rows], bitmask, list(range(len(rows))))
        mask = unpack_bitmask(bitmask, self.backend.vocab_size, device)
        if len(rows) == len(reqs):
            return mask, None
        return mask, torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
