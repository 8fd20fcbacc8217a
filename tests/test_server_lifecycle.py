"""End-to-end: how `anyserve serve` starts and stops. SIGTERM and SIGINT stop the front end and
its scheduler with exit 0 (also with a stream in flight); a dead scheduler turns /health into 503
and the front end exits non-zero instead of hanging; a bad --model-path fails fast and clearly;
--help lists every flag of ServerArgs."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from engine.server_args import ServerArgs
from server_fixture import REPO_ROOT, ServerProcess, pid_alive, start_server

# Longer than uvicorn's graceful-shutdown wait and than the whole test: the tiny model decodes
# ~1000 tokens/s, so the server admits a context beyond the model's 2048 positions.
CONTEXT = 32768
LONG_STREAM = {"text": "Keep talking", "stream": True,
               "sampling_params": {"max_new_tokens": CONTEXT - 100, "ignore_eos": True}}


class _StreamReader(threading.Thread):
    """Reads a streaming /generate until the server ends it (however it ends)."""

    def __init__(self, srv: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.srv = srv
        self.started = threading.Event()
        self.body = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.srv.base_url, timeout=60) as c:
                with c.stream("POST", "/generate", json=LONG_STREAM) as r:
                    for chunk in r.iter_bytes():
                        self.body += chunk
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.started.set()


@pytest.fixture
def server(llama_tiny):
    srv = start_server(llama_tiny, "--context-length", str(CONTEXT))
    yield srv
    srv.kill()      # no-op when the test stopped it
    shutil.rmtree(srv.work_dir, ignore_errors=True)


def test_startup_log_says_what_was_chosen(server):
    deadline = time.monotonic() + 10
    while "ready: http" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    for want in ("device=cpu", "dtype=", "attention=torch", "kv_capacity=", "overlap_schedule=",
                 "chat: tool-call parser", "reasoning parser none", "grammar backend xgrammar", "ready: http"):
        assert want in log, f"{want!r} not in the startup log:\n{log[-3000:]}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_both_processes_with_exit_0(server, sig):
    scheduler = server.scheduler_pid()
    reader = _StreamReader(server)
    reader.start()
    assert reader.started.wait(30) and b"data:" in reader.body, "the stream produced nothing"
    t0 = time.monotonic()
    code = server.stop(sig, timeout=20)         # also checks that every child is gone
    assert code == 0, f"exit code {code} after {sig.name}; log:\n{server.log_tail()}"
    assert time.monotonic() - t0 < 20
    assert not pid_alive(scheduler)
    reader.join(10)
    assert not reader.is_alive(), "the client's stream was left hanging after the server stopped"


def test_killed_scheduler_answers_503_and_exits_nonzero(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    reader = _StreamReader(server)
    reader.start()
    assert reader.started.wait(30)
    t0 = time.monotonic()
    os.kill(server.scheduler_pid(), signal.SIGKILL)
    statuses = []
    with httpx.Client(base_url=server.base_url, timeout=2) as c:
        while time.monotonic() - t0 < 10 and server.proc.poll() is None:
            try:
                statuses.append(c.get("/health").status_code)
            except httpx.TransportError:
                break               # the front end has gone
            if statuses[-1] == 503:
                r = c.post("/v1/completions", json={"model": "x", "prompt": "hi"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "scheduler_dead", r.text
                break
            time.sleep(0.02)
    assert 503 in statuses, f"/health never answered 503 after the scheduler died: {statuses[-5:]}"
    code = server.wait_exit(10)
    assert code != 0, "the front end must fail when its scheduler dies"
    assert time.monotonic() - t0 < 10, "the front end took too long to give up"
    server.assert_all_gone()
    reader.join(10)
    assert not reader.is_alive(), "a stream in flight hung after the scheduler died"
    assert b"scheduler" in reader.body or reader.error is not None, reader.body[-300:]
    assert "scheduler" in server.log()


def _serve(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "serve", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", **os.environ})


def test_bad_model_path_fails_fast_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    t0 = time.monotonic()
    done = _serve("--model-path", str(missing), "--device", "cpu", "--port", "0", "--grpc-port", "0",
                  timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - t0 < 30
    out = done.stdout + done.stderr
    assert str(missing) in out and "--model-path" in out, out[-2000:]


def test_help_mentions_every_flag():
    done = _serve("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerArgs)]
    missing = [f for f in flags if f not in done.stdout]
    assert not missing, f"serve --help does not mention {missing}"
