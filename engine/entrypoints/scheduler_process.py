"""The scheduler in its own process, reached over ZeroMQ (one PUSH/PULL pair each way).

The child sends a SchedulerInfo once the model is loaded (or a SchedulerError), then runs
the event loop. It exits when its parent dies. With ``--tp-size N`` this process is tensor-parallel
rank 0 and the other ranks of this machine run beside it (``_tp_worker_main``), each loading
its shard and running the batches rank 0 broadcasts.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import socket
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

    try:
        run_event_loop(scheduler, recv, send, stop)
    finally:
        scheduler.runner.shutdown()


def _tp_worker_main(server_args: ServerArgs, tp_rank: int, parent_pid: int) -> None:
    from engine.entrypoints.logging_setup import setup_logging
    from engine.runner.tp_worker import run_tp_worker

    setup_logging(server_args.log_level)
    try:
        run_tp_worker(server_args, tp_rank, parent_pid)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", tp_rank)
        raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_dist_addr(server_args: ServerArgs) -> ServerArgs:
    """A copy whose --dist-init-addr is set (a free local port when left out and tp > 1)."""
    if server_args.tp_size == 1 or server_args.dist_init_addr:
        return server_args
    return dataclasses.replace(server_args, dist_init_addr=f"127.0.0.1:{free_port()}")


def start_tp_workers(server_args: ServerArgs, mp_ctx: Any, name: str = "anyserve") -> list:
    """Start this machine's tensor-parallel ranks other than 0 (rank 0 is the scheduler)."""
    from engine.runner.tp_worker import ranks_per_node

    per_node = ranks_per_node(server_args)
    first = server_args.node_rank * per_node
    procs = []
    for rank in range(max(1, first), first + per_node):
        p = mp_ctx.Process(target=_tp_worker_main, name=f"{name}-tp{rank}",
                           args=(server_args, rank, os.getpid()), daemon=True)
        p.start()
        procs.append(p)
    return procs


def run_node_workers(server_args: ServerArgs) -> int:
    """``anyserve serve --node-rank K`` (K > 0): this machine's ranks only; no front end. Returns
    when they exit (when node 0 stops, or one fails)."""
    server_args = with_dist_addr(server_args)
    procs = start_tp_workers(server_args, mp.get_context("spawn"))
    logger.info("node %d of %d: tensor-parallel ranks %s started, joining %s", server_args.node_rank,
                server_args.nnodes, [p.name for p in procs], server_args.dist_init_addr)
    try:
        while all(p.is_alive() for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    return max((p.exitcode or 0) for p in procs)


class ProcessSchedulerClient(SchedulerClient):
    """Starts the scheduler process and waits until its model is loaded."""

    def __init__(self, server_args: ServerArgs, startup_timeout: float = 1800.0,
                 name: str = "anyserve-scheduler") -> None:
        server_args = with_dist_addr(server_args)
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
        self.process = mp_ctx.Process(target=_scheduler_main, name=name,
                                      args=(server_args, in_addr, out_addr, os.getpid()), daemon=True)
        self.process.start()
        prefix = "anyserve" if name == "anyserve-scheduler" else name   # replicas: anyserve-dp1-tp1
        self.tp_processes = start_tp_workers(server_args, mp_ctx, prefix) if server_args.tp_size > 1 else []
        try:
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self._terminate()
            raise
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
            for p in (self.process, *self.tp_processes):
                if not p.is_alive():
                    raise RuntimeError(f"{p.name} exited with code {p.exitcode} while starting "
                                       "(see its log above)")
        raise TimeoutError(f"the scheduler did not start within {timeout:.0f}s")

    def start(self, on_output: OnOutput) -> None:
        def read() -> None:
            while not self._closing:
                if self._pull.poll(timeout=200):
                    on_output(pickle.loads(self._pull.recv()))
                elif not self.is_alive():
                    if not self._closing:
                        dead = next(p for p in (self.process, *self.tp_processes) if not p.is_alive())
                        on_output(SchedulerError(f"{dead.name} exited with code {dead.exitcode}"))
                    return

        self._reader = threading.Thread(target=read, name="anyserve-scheduler-reader", daemon=True)
        self._reader.start()

    def send(self, msg: Any) -> None:
        self._push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def is_alive(self) -> bool:
        return self.process.is_alive() and all(p.is_alive() for p in self.tp_processes)

    def _terminate(self) -> None:
        procs = [self.process, *self.tp_processes]
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def shutdown(self) -> None:
        self._closing = True
        self._terminate()
        if self._reader is not None:
            self._reader.join(timeout=2)
        self._ctx.destroy(linger=0)
