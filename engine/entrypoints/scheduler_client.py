"""How the front end reaches the scheduler: a thread in this process (offline Engine) or a
separate process over ZeroMQ (server). Both carry the same typed messages."""
from __future__ import annotations

import gc
import logging
import queue
import threading
from typing import Any, Callable, Optional

from engine.io_struct import SchedulerInfo
from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)

OnOutput = Callable[[Any], None]


class SchedulerClient:
    info: SchedulerInfo

    def start(self, on_output: OnOutput) -> None:
        raise NotImplementedError

    def send(self, msg: Any) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class ThreadSchedulerClient(SchedulerClient):
    """The scheduler runs in a daemon thread of this process."""

    def __init__(self, server_args: ServerArgs) -> None:
        from engine.scheduler.scheduler import Scheduler

        self.scheduler: Optional[Scheduler] = Scheduler(server_args)
        self.info = self.scheduler.info
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, on_output: OnOutput) -> None:
        from engine.scheduler.event_loop import run_event_loop

        def recv(block: bool) -> list:
            msgs = []
            try:
                msgs.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
                while True:
                    msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            return msgs

        def target() -> None:
            try:
                run_event_loop(self.scheduler, recv, on_output, self._stop)
            except BaseException as e:  # noqa: BLE001 - reported through on_output already
                self._error = e

        self._thread = threading.Thread(target=target, name="anyserve-scheduler", daemon=True)
        self._thread.start()

    def send(self, msg: Any) -> None:
        self._inbox.put(msg)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the thread and give the device memory back (weights, KV pool, graphs): the
        scheduler is dropped here, so a second Engine in this process starts with a free device."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                logger.warning("the scheduler thread did not stop within 30 s; its device memory stays held")
                return
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is None:
            return
        platform = scheduler.runner.platform
        del scheduler
        gc.collect()                  # the model and the pools sit in reference cycles
        platform.empty_cache()
