"""The scheduler in its own process, reached over ZeroMQ (one PUSH/PULL pair each way).

The child sends a SchedulerInfo once the model is loaded (or a SchedulerError), then runs
the event loop. It exits when its parent dies.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import threading
import time
from typing import Any, Optional

import zmq

from engine.entrypoints.scheduler_client import OnOutput, SchedulerClient
from engine.io_struct import SchedulerError, SchedulerInfo
from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)


def _scheduler_main(server_args: ServerArgs, in_addr: str, out_addr: str, parent_pid: int) -> None:
    from engine.entrypoints.logging_setup import setup_logging
    from engine.scheduler.event_loop import run_event_loop
    from engine.scheduler.scheduler import Scheduler

    setup_logging(server_args.log_level)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(in_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(out_addr)

    def send(obj: Any) -> None:
        push.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        scheduler = Scheduler(server_args)
    except Exception as e:
        logger.exception("scheduler failed to start")
        send(SchedulerError(f"{type(e).__name__}: {e}"))
        time.sleep(0.5)  # let the message leave before the process exits
        raise SystemExit(1)
    send(scheduler.info)
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    stop = threading.Event()

    def recv(block: bool) -> list:
        if os.getppid() != parent_pid:
            logger.error("the front end process is gone; the scheduler exits")
            stop.set()
            return []
        msgs = []
        if block:
            poller.poll(timeout=100)
        while True:
            try:
                msgs.append(pickle.loads(pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return msgs

    run_event_loop(scheduler, recv, send, stop)


class ProcessSchedulerClient(SchedulerClient):
    """Starts the scheduler process and waits until its model is loaded."""

    def __init__(self, server_args: ServerArgs, startup_timeout: float = 1800.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="anyserve-ipc-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(in_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(out_addr)
        # Idle OpenMP threads of the scheduler otherwise spin and starve the front end on the
        # same cores (measured on 2 cores: 64 streams took 5-9 s spinning, 0.9-1.7 s passive).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        mp_ctx = mp.get_context("spawn")
        self.process = mp_ctx.Process(target=_scheduler_main, name="anyserve-scheduler",
                                      args=(server_args, in_addr, out_addr, os.getpid()), daemon=True)
        self.process.start()
        self.info = self._wait_ready(startup_timeout)
        self._reader: Optional[threading.Thread] = None
        self._closing = False

    def _wait_ready(self, timeout: float) -> SchedulerInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pull.poll(timeout=200):
                obj = pickle.loads(self._pull.recv())
                if isinstance(obj, SchedulerError):
                    self.process.join(timeout=5)
                    raise RuntimeError(f"the scheduler failed to start: {obj.message}")
                return obj
            if not self.process.is_alive():
                raise RuntimeError(f"the scheduler process exited with code {self.process.exitcode} "
                                   "while starting (see its log above)")
        raise TimeoutError(f"the scheduler did not start within {timeout:.0f}s")

    def start(self, on_output: OnOutput) -> None:
        def read() -> None:
            while not self._closing:
                if self._pull.poll(timeout=200):
                    on_output(pickle.loads(self._pull.recv()))
                elif not self.process.is_alive():
                    if not self._closing:
                        on_output(SchedulerError(f"the scheduler process exited with code "
                                                 f"{self.process.exitcode}"))
                    return

        self._reader = threading.Thread(target=read, name="anyserve-scheduler-reader", daemon=True)
        self._reader.start()

    def send(self, msg: Any) -> None:
        self._push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self) -> None:
        self._closing = True
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
        if self._reader is not None:
            self._reader.join(timeout=2)
        self._ctx.destroy(linger=0)
