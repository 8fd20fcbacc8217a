"""Running several generations of one API request at once (n > 1, a batch of prompts).

`FanOut` starts one `TokenizerManager.generate` per (prompt, sample), each in its own task,
and keeps only the newest cumulative output of each (outputs are cumulative, so a slow
consumer costs no memory). Closing it (client gone, error, done) cancels the tasks, which
makes the TokenizerManager abort the requests that are still running. The HTTP, gRPC and
offline front ends all use it.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from engine.io_struct import GenerateRequest

logger = logging.getLogger(__name__)

# Returns when the client has gone away.
Disconnected = Callable[[], Awaitable[None]]


class ClientDisconnected(Exception):
    pass


@dataclass
class _Slot:
    latest: Optional[dict] = None
    fresh: bool = False
    done: bool = False
    error: Optional[BaseException] = None


class FanOut:
    """Generations of one API request; index i is the i-th GenerateRequest."""

    def __init__(self, tm: Any, reqs: list[GenerateRequest], inflight: Optional[set[str]] = None) -> None:
        self.tm = tm
        self.reqs = reqs
        self.inflight = inflight if inflight is not None else set()
        self.slots = [_Slot() for _ in reqs]
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._tracked: list[str] = []       # rids this FanOut added to `inflight`

    async def _pump(self, i: int, req: GenerateRequest) -> None:
        slot = self.slots[i]
        gen = self.tm.generate(req)
        try:
            async for out in gen:
                slot.latest, slot.fresh = out, True
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which decides
            slot.error = e
        finally:
            slot.done = True
            self._changed.set()
            await gen.aclose()

    def _launch(self) -> None:
        if not self._tasks:
            for i, req in enumerate(self.reqs):
                if req.rid and req.rid not in self.inflight:
                    self.inflight.add(req.rid)
                    self._tracked.append(req.rid)
                self._tasks.append(asyncio.create_task(self._pump(i, req)))

    async def _wait_until(self, ready, disconnected: Optional[Disconnected]) -> None:
        """Wait until ready() holds; raise ClientDisconnected if the client leaves first."""
        watcher = asyncio.create_task(disconnected()) if disconnected is not None else None
        waiter: Optional[asyncio.Task] = None
        try:
            while not ready():
                self._changed.clear()
                if ready():
                    break
                waiter = asyncio.create_task(self._changed.wait())
                pending = {waiter} | ({watcher} if watcher else set())
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if watcher is not None and watcher in done:
                    raise ClientDisconnected()
        finally:
            for t in (watcher, waiter):
                if t is not None:
                    t.cancel()

    def _first_error(self) -> Optional[BaseException]:
        return next((s.error for s in self.slots if s.error is not None), None)

    async def start(self, disconnected: Optional[Disconnected] = None) -> None:
        """Launch all generations and wait for the first output of each, so that a bad
        request (ValueError from the TokenizerManager) is known before any response starts."""
        self._launch()
        try:
            await self._wait_until(
                lambda: self._first_error() is not None
                or all(s.latest is not None or s.done for s in self.slots), disconnected)
            err = self._first_error()
            if err is None and any(s.latest is None for s in self.slots):
                err = RuntimeError("a generation ended without producing any output")
            if err is not None:
                raise err
        except BaseException:
            self.close()
            raise

    async def finals(self, disconnected: Optional[Disconnected] = None) -> list[dict]:
        """Wait for every generation to finish; the last output of each, by index."""
        self._launch()
        try:
            await self._wait_until(
                lambda: self._first_error() is not None or all(s.done for s in self.slots), disconnected)
            err = self._first_error()
            if err is not None:
                raise err
            return [s.latest for s in self.slots]
        finally:
            self.close()

    async def updates(self) -> AsyncIterator[tuple[int, dict]]:
        """(index, newest cumulative output) as outputs arrive, until all are done."""
        self._launch()
        while True:
            for i, s in enumerate(self.slots):
                if s.fresh:
                    s.fresh = False
                    yield i, s.latest
            err = self._first_error()
            if err is not None:
                raise err
            if all(s.done for s in self.slots) and not any(s.fresh for s in self.slots):
                return
            self._changed.clear()
            if not any(s.fresh for s in self.slots) and not all(s.done for s in self.slots):
                await self._changed.wait()

    def close(self) -> None:
        """Cancel what still runs (the TokenizerManager aborts those requests). Synchronous
        on purpose: it must work inside an already-cancelled scope."""
        for t in self._tasks:
            if not t.done():
                t.cancel()
        for rid in self._tracked:
            self.inflight.discard(rid)
        self._tracked.clear()
