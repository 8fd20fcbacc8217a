"""`anyserve router` (engine/router/server.py): first over mocked workers (routing keys, retry
after a failed connection, 503 with no healthy worker, 400 on bad JSON, a worker failing
mid-stream, health transitions, the API key), then in front of two real `anyserve serve`
processes, one of which is killed with requests in flight."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest

from engine.router.args import RouterArgs
from engine.router.server import Router, build_router_app, routing_key
from server_fixture import REPO_ROOT, _die_with_parent, free_port, metric, start_server

W0, W1 = "http://w0:8000", "http://w1:8000"


# ---- over mocked workers ---------------------------------------------------------------------------
def test_routing_key_is_the_prompt():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert routing_key("/v1/chat/completions", chat) == "Be brief.\nHi"
    assert routing_key("/v1/completions", {"prompt": "Once upon"}) == "Once upon"
    assert routing_key("/v1/completions", {"prompt": [1, 2, 3]}) == (1, 2, 3)
    assert routing_key("/generate", {"text": ["a", "b"]}) == "a\nb"
    assert routing_key("/generate", {"input_ids": [[4, 5], [6]]}) == (4, 5)
    assert routing_key("/v1/chat/completions", {"messages": "not a list"}) == ""


class _FailingStream(httpx.AsyncByteStream):
    """One SSE event, then the connection breaks (a worker killed mid-stream)."""

    async def __aiter__(self):
        yield b'data: {"text": "partial"}\n\n'
        raise httpx.ReadError("connection reset by peer")


def _ok_worker(name: str) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "owned_by": name}]})
        body = json.loads(request.content)
        if body.get("stream"):
            events = b'data: {"from": "%s"}\n\ndata: [DONE]\n\n' % name.encode()
            return httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"from": name, "auth": request.headers.get("authorization")})
    return handle


def _refusing(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _router(workers: dict[str, Callable], **kw) -> tuple[Router, httpx.AsyncClient]:
    def handle(request: httpx.Request) -> httpx.Response:
        return workers[f"{request.url.scheme}://{request.url.host}:{request.url.port}"](request)

    args = RouterArgs(worker_urls=list(workers), **kw)
    router = Router(args, transport=httpx.MockTransport(handle))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_router_app(router)),
                               base_url="http://router")
    return router, client


def _run(coro):
    return asyncio.run(coro)


def test_a_failed_connection_is_retried_on_another_worker():
    async def go():
        workers = {W0: _ok_worker("w0"), W1: _ok_worker("w1")}
        router, client = _router(workers, load_balance_method="round_robin")
        await router.check_health()
        workers[W0] = _refusing                  # dies after its last health check
        r = await client.post("/v1/completions", json={"prompt": "hi"},
                              headers={"authorization": "Bearer k"})
        assert r.status_code == 200 and r.json() == {"from": "w1", "auth": "Bearer k"}
        info = (await client.get("/workers")).json()["workers"]
        assert [w["healthy"] for w in info] == [False, True]
        assert "connection refused" in info[0]["last_error"]
        assert "anyserve_router:retries_total 1.0" in (await client.get("/metrics")).text
        # the next requests skip the dead worker
        for _ in range(3):
            assert (await client.post("/generate", json={"text": "x"})).json()["from"] == "w1"
    _run(go())


def test_no_healthy_worker_is_503_and_bad_json_is_400():
    async def go():
        router, client = _router({W0: _refusing, W1: _refusing})
        await router.check_health()
        assert (await client.get("/health")).status_code == 503
        r = await client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == 503 and err["type"] == "service_unavailable" and W0 in err["message"]
        assert (await client.get("/v1/models")).status_code == 503
        r = await client.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await client.post("/generate", json=[1, 2])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    _run(go())


def test_both_workers_refusing_ends_with_502_after_one_retry():
    async def go():
        workers = {W0: _ok_worker("w0"), W1: _ok_worker("w1")}
        router, client = _router(workers)
        await router.check_health()
        workers[W0] = workers[W1] = _refusing
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["code"] == 502 and err["message"].startswith("worker http://w") and "failed" in err["message"]
    _run(go())


def test_a_worker_failing_mid_stream_ends_the_stream_with_an_error_event():
    def breaking(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, stream=_FailingStream(), headers={"content-type": "text/event-stream"})

    async def go():
        router, client = _router({W0: breaking})
        await router.check_health()
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e]
        assert events[0] == 'data: {"text": "partial"}'
        err = json.loads(events[1].removeprefix("data: "))["error"]
        assert err["code"] == 502 and err["message"].startswith(f"worker {W0} failed: ReadError")
        assert events[2] == "data: [DONE]"
        assert not router.workers[0].healthy and router.workers[0].in_flight == 0
    _run(go())


def test_health_checks_take_workers_out_and_back():
    async def go():
        workers = {W0: _ok_worker("w0"), W1: _ok_worker("w1")}
        router, client = _router(workers, load_balance_method="cache_aware")
        await router.check_health()
        r = await client.post("/v1/completions", json={"prompt": "a long shared prefix " * 4 + "1"})
        first = r.json()["from"]
        r = await client.post("/v1/completions", json={"prompt": "a long shared prefix " * 4 + "2"})
        assert r.json()["from"] == first             # cache_aware: same prefix, same worker
        dead = W0 if first == "w0" else W1
        workers[dead] = lambda req: httpx.Response(503)
        await router.check_health()
        assert (await client.get("/health")).status_code == 200
        r = await client.post("/v1/completions", json={"prompt": "a long shared prefix " * 4 + "3"})
        assert r.json()["from"] != first
        assert 'anyserve_router:worker_up{worker="%s"} 0.0' % dead in (await client.get("/metrics")).text
        workers[dead] = _ok_worker(first)
        await router.check_health()
        assert all(w["healthy"] for w in (await client.get("/workers")).json()["workers"])
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "m"
    _run(go())


def test_api_key_is_required_except_for_probes():
    async def go():
        router, client = _router({W0: _ok_worker("w0")}, api_key="secret")
        await router.check_health()
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/workers")).status_code == 401
        r = await client.post("/generate", json={"text": "x"}, headers={"authorization": "Bearer secret"})
        assert r.status_code == 200 and r.json()["auth"] == "Bearer secret"
    _run(go())


def test_router_args_name_the_bad_flag():
    with pytest.raises(ValueError, match="--worker-urls"):
        RouterArgs(worker_urls=["localhost:8000"])
    with pytest.raises(ValueError, match="--health-check-interval"):
        RouterArgs(worker_urls=[W0], health_check_interval=0)


def test_router_help_explains_every_flag():
    done = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "router", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(RouterArgs)]
    assert not [f for f in flags if f not in done.stdout]
    bad = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "router", "--worker-urls", "w0:1"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--worker-urls must be http:// or https:// URLs" in bad.stderr


# ---- in front of two real servers ----------------------------------------------------------------
# The tiny model decodes ~1000 tokens/s: a request for 30000 tokens is in flight for seconds.
CONTEXT = 32768
HEALTH_INTERVAL = 0.5


class RouterProcess:
    def __init__(self, worker_urls: list[str], *extra: str) -> None:
        self.port = free_port()
        self.work = Path(tempfile.mkdtemp(prefix="anyserve-router-"))
        cmd = [sys.executable, "-m", "engine.entrypoints.cli", "router", "--worker-urls", *worker_urls,
               "--port", str(self.port), "--health-check-interval", str(HEALTH_INTERVAL),
               "--health-check-timeout", "1", *extra]
        with open(self.work / "router.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the router exited: {self.log()}"
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the router did not become healthy; log:\n{self.log()}")

    def log(self) -> str:
        return (self.work / "router.log").read_text(errors="replace")

    def workers(self) -> list[dict]:
        return httpx.get(self.base_url + "/workers", timeout=5).json()["workers"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the router did not stop on SIGTERM; log:\n{self.log()}") from None


@pytest.fixture(scope="module")
def fleet(llama_tiny):
    extra = ("--served-model-name", "tiny", "--context-length", str(CONTEXT), "--grpc-port", "0")
    # one after the other from this thread: a server dies with the thread that started it
    servers = [start_server(llama_tiny, *extra)]
    router = None
    try:
        servers.append(start_server(llama_tiny, *extra))
        router = RouterProcess([s.base_url for s in servers])
        yield router, servers
        assert router.stop() == 0, router.log()
        shutil.rmtree(router.work, ignore_errors=True)
    finally:
        if router is not None and router.proc.poll() is None:
            router.proc.kill()
        for s in servers:
            s.kill()
            shutil.rmtree(s.work_dir, ignore_errors=True)


def test_requests_pass_through_the_router(fleet):
    router, servers = fleet
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="none", timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=8)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny", prompt="A different prompt entirely", max_tokens=8,
                                            stream=True))
    assert chunks and "".join(c.choices[0].text for c in chunks if c.choices)
    native = httpx.post(router.base_url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 3}},
                        timeout=60)
    assert native.status_code == 200 and native.json()["meta_info"]["completion_tokens"] == 3
    workers = router.workers()
    assert all(w["healthy"] for w in workers) and sum(w["requests"] for w in workers) == 3
    assert all(w["in_flight"] == 0 for w in workers)


def test_a_client_going_away_stops_the_generation_on_the_worker(fleet):
    router, servers = fleet
    with pytest.raises(httpx.ReadTimeout):      # the client gives up on a long answer
        httpx.post(router.base_url + "/v1/completions", json=_long_request(False), timeout=1.5)
    with httpx.Client(timeout=60) as c, c.stream("POST", router.base_url + "/v1/completions",
                                                 json=_long_request(True)) as stream:
        next(stream.iter_bytes())               # started; leaving the block hangs up
    deadline = time.monotonic() + 10
    while True:
        running = [metric(httpx.get(s.base_url + "/metrics").text, "anyserve:num_running_reqs") for s in servers]
        idle = all(w["in_flight"] == 0 for w in router.workers()) and running == [0, 0]
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, (router.workers(), running)


def _long_request(stream: bool) -> dict:
    return {"model": "tiny", "prompt": "Keep talking about the weather", "max_tokens": CONTEXT - 100,
            "ignore_eos": True, "stream": stream}


def test_killed_worker_fails_its_requests_with_502_and_the_other_serves(fleet):
    router, servers = fleet
    by_url = {s.base_url: s for s in servers}
    result: dict = {}

    def non_stream() -> None:
        r = httpx.post(router.base_url + "/v1/completions", json=_long_request(False), timeout=60)
        result["status"], result["body"], result["done"] = r.status_code, r.json(), time.monotonic()

    t = threading.Thread(target=non_stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not any(w["in_flight"] for w in router.workers()):
        assert time.monotonic() < deadline, "the long request never reached a worker"
        time.sleep(0.05)
    victim = next(w["url"] for w in router.workers() if w["in_flight"])
    with httpx.Client(timeout=60) as c, c.stream("POST", router.base_url + "/v1/completions",
                                                 json=_long_request(True)) as stream:
        assert stream.status_code == 200
        chunks = stream.iter_bytes()        # one iterator: leaving a for loop early would hang up
        body = next(chunks)
        # the same prompt: cache_aware sends it to the same worker
        assert [w["in_flight"] for w in router.workers() if w["url"] == victim] == [2]
        killed_at = time.monotonic()
        by_url[victim].kill()
        for chunk in chunks:
            body += chunk
    stream_ended = time.monotonic() - killed_at
    t.join(15)
    assert not t.is_alive(), "the non-streaming request hung after its worker died"
    assert result["status"] == 502, result
    err = result["body"]["error"]
    assert err["code"] == 502 and err["message"].startswith(f"worker {victim} failed"), err
    assert result["done"] - killed_at < 10 and stream_ended < 10
    events = [e for e in body.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"].startswith(f"worker {victim} failed")

    time.sleep(2 * HEALTH_INTERVAL)
    assert [w["healthy"] for w in router.workers() if w["url"] == victim] == [False]
    assert httpx.get(router.base_url + "/health").status_code == 200
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="none", timeout=60, max_retries=0)
    for k in range(4):
        prompt = "Keep talking about the weather" if k % 2 else f"Something else {k}"
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, stream=bool(k % 2))
        if k % 2:
            assert "".join(c.choices[0].text for c in out if c.choices) is not None
        else:
            assert out.usage.completion_tokens == 4
    survivor = next(w for w in router.workers() if w["url"] != victim)
    assert survivor["healthy"] and survivor["in_flight"] == 0
    metrics = httpx.get(router.base_url + "/metrics").text
    assert f'anyserve_router:worker_up{{worker="{victim}"}} 0.0' in metrics
    assert f'anyserve_router:request_errors_total{{kind="disconnect",worker="{victim}"}} 2.0' in metrics
