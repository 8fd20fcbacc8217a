"""A real `anyserve serve` process on localhost for end-to-end tests.

    with running_server(model_path, "--served-model-name", "m", api_key="k") as srv:
        httpx.get(srv.base_url + "/v1/models", headers=srv.auth_headers); grpc.insecure_channel(srv.grpc_address)

`start_server` launches `python -m engine.entrypoints.cli serve --device cpu` on free ports with
its own ANYSERVE_CACHE, waits for GET /health to answer 200 and shows the server's log when it
does not. `ServerProcess.stop` sends a signal and checks that the front end and its scheduler
child are both gone, with exit code 0. Tests share one server per module (startup takes seconds).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import httpx

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
REPO_ROOT = Path(__file__).resolve().parent.parent
_LOG_TAIL_CHARS = 6000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_path: str | Path, port: int, grpc_port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.entrypoints.cli", "serve", "--model-path", str(model_path),
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
            *extra]


def children_of(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc; empty once `pid` is gone)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    work_dir: Path          # holds server.log and, unless given, the cache
    cache_dir: Path
    api_key: Optional[str] = None
    child_pids: list[int] = field(default_factory=list)     # the scheduler and multiprocessing's helper

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def log_tail(self) -> str:
        return self.log()[-_LOG_TAIL_CHARS:]

    def scheduler_pids(self) -> list[int]:
        """The scheduler children (spawned by multiprocessing; the resource tracker is the other
        child): one per data-parallel replica and tensor-parallel rank."""
        return [p for p in children_of(self.pid) if "spawn_main" in cmdline(p)]

    def scheduler_pid(self) -> int:
        """The scheduler child of a server with one."""
        pids = self.scheduler_pids()
        assert len(pids) == 1, f"expected one scheduler child of {self.pid}, found {pids}: " \
                               f"{[cmdline(p) for p in children_of(self.pid)]}"
        return pids[0]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server (pid {self.pid}) did not exit within {timeout:.0f}s; "
                                 f"log:\n{self.log_tail()}") from None

    def assert_all_gone(self, timeout: float = 5.0) -> None:
        """No child of the server (the scheduler above all) may outlive the front end."""
        deadline = time.monotonic() + timeout
        left = [p for p in self.child_pids if pid_alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if pid_alive(p)]
        assert not left, f"child process(es) {[(p, cmdline(p)) for p in left]} still alive after the front " \
                         f"end exited; log:\n{self.log_tail()}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig`, wait for the exit, check the scheduler is gone; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.wait_exit(timeout)
        self.assert_all_gone()
        return code

    def kill(self) -> None:
        """Last resort cleanup (after a failure): SIGKILL the front end and its scheduler."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in self.child_pids:     # only while still one of ours (pids get reused)
            if pid_alive(pid) and "multiprocessing" in cmdline(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, so that a killed test
    run leaves no server behind (Linux; the parent is the thread that started it)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


def _wait_healthy(srv: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = srv.proc.poll()
            if code is not None:
                raise RuntimeError(f"the server exited with code {code} while starting; log:\n{srv.log_tail()}")
            try:
                r = client.get(srv.base_url + "/health")
                if r.status_code == 200:
                    return
                last = f"/health answered {r.status_code}"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health 200 within {timeout:.0f}s ({last}); "
                       f"log:\n{srv.log_tail()}")


def start_server(model_path: str | Path, *extra: str, api_key: Optional[str] = None,
                 cache_dir: Optional[Path] = None, startup_timeout: float = STARTUP_TIMEOUT_S,
                 num_schedulers: int = 1) -> ServerProcess:
    """Launch a server and return once /health answers 200 (raises with the log otherwise).
    The caller must `stop()` it (or use `running_server`)."""
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    work = Path(tempfile.mkdtemp(prefix="anyserve-server-"))
    cache_dir = cache_dir or work / "cache"
    args = list(extra) + (["--api-key", api_key] if api_key else [])
    # One torch thread unless told otherwise: on a small machine the scheduler's OpenMP threads
    # otherwise spin against the front end and the test client, and steps slow down 10x at random.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "ANYSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    with open(work / "server.log", "wb") as log:
        proc = subprocess.Popen(serve_command(model_path, port, grpc_port, *args), cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    srv = ServerProcess(proc, port, grpc_port, work, cache_dir, api_key)
    try:
        _wait_healthy(srv, startup_timeout)
        pids = srv.scheduler_pids()
        assert len(pids) == num_schedulers, f"expected {num_schedulers} scheduler children, found {pids}"
        srv.child_pids = children_of(srv.pid)
    except BaseException:
        srv.child_pids = children_of(srv.pid)
        srv.kill()
        raise
    return srv


@contextlib.contextmanager
def running_server(model_path: str | Path, *extra: str, api_key: Optional[str] = None,
                   expect_exit: Optional[int] = 0, num_schedulers: int = 1) -> Iterator[ServerProcess]:
    """A server for the duration of the block; on exit SIGTERM, and the exit code must be
    `expect_exit` within STOP_TIMEOUT_S (None: whatever it is, e.g. a test already stopped it).
    Its folder (log, cache) is removed after a clean stop and kept otherwise."""
    srv = start_server(model_path, *extra, api_key=api_key, num_schedulers=num_schedulers)
    try:
        yield srv
        code = srv.stop()
    except BaseException:
        srv.kill()
        raise
    if expect_exit is not None:
        assert code == expect_exit, f"the server exited with {code}, expected {expect_exit}; " \
                                    f"log:\n{srv.log_tail()}"
    shutil.rmtree(srv.work_dir, ignore_errors=True)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample `name` in Prometheus text."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(client: httpx.Client, timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV slot is held (token_usage 0:
    free + evictable = capacity). Returns the last gauges; asserts on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        gauges = {k: metric(text, f"anyserve:{k}") for k in ("num_running_reqs", "num_queue_reqs", "token_usage")}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            assert all(v == 0 for v in gauges.values()), f"not idle after {timeout}s: {gauges}"
            return gauges
        time.sleep(0.1)


def chat_once(model_path: str | Path, messages: list[dict], max_tokens: int = 8, **body) -> dict:
    """Serve ``model_path`` (CPU, small KV), send one greedy /v1/chat/completions request, and
    return the answer's JSON (the status must be 200)."""
    import httpx

    with running_server(model_path, "--max-total-tokens", "2048", "--grpc-port", "0") as srv:
        model = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()
