"""The scheduler's loop: drain messages, run one step, send outputs; with a watchdog."""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable

from engine.io_struct import SchedulerError
from engine.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

# recv(block) -> list of messages; block=True may wait until one arrives (or a short timeout).
Recv = Callable[[bool], list]
Send = Callable[[Any], None]


def run_event_loop(scheduler: Scheduler, recv: Recv, send: Send, stop: threading.Event) -> None:
    watchdog = Watchdog(scheduler.args.watchdog_timeout, send)
    try:
        while not stop.is_set():
            for msg in recv(scheduler.is_idle()):
                reply = scheduler.handle(msg)
                if reply is not None:
                    send(reply)
            with watchdog.step():
                scheduler.step()
            out = scheduler.take_outputs()
            if out is not None:
                send(out)
    except Exception as e:  # the front end must learn that we are gone
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        send(SchedulerError(f"{type(e).__name__}: {e}"))
        raise
    finally:
        watchdog.close()


class Watchdog:
    """Reports a step that runs longer than ``timeout`` seconds (a stuck device or kernel)."""

    def __init__(self, timeout: float, send: Send) -> None:
        self.timeout = timeout
        self.send = send
        self.step_start: float = 0.0
        self._closed = threading.Event()
        self.fired = False
        if timeout and timeout > 0:
            threading.Thread(target=self._watch, name="anyserve-watchdog", daemon=True).start()

    def step(self) -> "Watchdog":
        return self

    def __enter__(self) -> None:
        self.step_start = time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        self.step_start = 0.0

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.timeout / 4)):
            start = self.step_start
            if start and time.monotonic() - start > self.timeout and not self.fired:
                self.fired = True
                msg = f"a scheduler step has run for more than --watchdog-timeout {self.timeout:g}s"
                logger.error(msg)
                self.send(SchedulerError(msg))

    def close(self) -> None:
        self._closed.set()
