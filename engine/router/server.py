"""``anyserve router``: one HTTP endpoint in front of several ``anyserve serve`` workers.

Clients speak the same OpenAI and native APIs to it as to one server. Each generation is
proxied to one worker picked by the load balancer (cache_aware keys on the prompt text);
streams pass through chunk by chunk. A background task probes every worker's /health and
takes failing ones out of rotation until they answer again; a worker that fails a request
is taken out at once. Failures are answered with OpenAI's error body: 502 when a worker
failed (in-band as a last SSE event once a stream has started), 503 when none is healthy,
504 when a worker did not answer within --request-timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from dataclasses import dataclass
from typing import Any, AsyncIterator, Hashable, Optional, Sequence

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.http_server import ApiKeyMiddleware
from engine.entrypoints.openai.errors import APIError, CatchAllMiddleware, error_body, install_error_handlers
from engine.entrypoints.openai.streaming import SSE_DONE, SSEResponse, sse, wait_disconnect
from engine.router.args import RouterArgs
from engine.router.policy import NoWorkerAvailable, make_load_balancer

logger = logging.getLogger("anyserve.router")

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate")
# Connecting is quick or the worker is gone: this bounds it even with a long --request-timeout.
_CONNECT_TIMEOUT_S = 5.0


@dataclass
class Worker:
    url: str
    healthy: bool = False
    in_flight: int = 0          # requests this router has open to it
    requests: int = 0
    errors: int = 0
    last_error: str = ""


def routing_key(path: str, payload: dict[str, Any]) -> Sequence[Hashable]:
    """What cache_aware matches on: the prompt text (chat: the messages' contents joined), or
    the token ids when the request gives ids. Malformed fields give an empty key; the worker
    answers them with a 400 of its own."""
    if path == "/v1/chat/completions":
        parts = []
        for m in payload.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    prompt = payload.get("prompt") if path == "/v1/completions" else payload.get("text")
    if prompt is None and path == "/generate":
        prompt = payload.get("input_ids")
    return _prompt_key(prompt)


def _prompt_key(prompt: Any) -> Sequence[Hashable]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(t, int) for t in prompt):
            return tuple(prompt)
        if isinstance(prompt[0], list):         # a batch of token-id prompts: the first one
            return _prompt_key(prompt[0])
    return ""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class RouterMetrics:
    """The router's own Prometheus metrics (`anyserve_router:...`), labelled by worker URL."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("anyserve_router:requests", "Requests sent to a worker.", ["worker"],
                                registry=r)
        self.errors = Counter("anyserve_router:request_errors", "Requests a worker failed, by kind: "
                              "connect, disconnect (died mid-request), timeout.", ["worker", "kind"],
                              registry=r)
        self.retries = Counter("anyserve_router:retries", "Requests retried on another worker after "
                               "a failed connection.", registry=r)
        self.no_worker = Counter("anyserve_router:no_healthy_worker", "Requests answered 503 because "
                                 "no worker was healthy.", registry=r)
        self.worker_up = Gauge("anyserve_router:worker_up", "1 while the worker is in rotation.",
                               ["worker"], registry=r)
        self.in_flight = Gauge("anyserve_router:worker_in_flight", "Requests open to the worker.",
                               ["worker"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Router:
    """Workers, their health, the load balancer and the upstream HTTP clients."""

    def __init__(self, args: RouterArgs, transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        self.args = args
        self.workers = [Worker(u.rstrip("/")) for u in args.worker_urls]
        self.balancer = make_load_balancer(
            args.load_balance_method, len(self.workers),
            balance_abs_threshold=args.router_balance_abs_threshold,
            balance_rel_threshold=args.router_balance_rel_threshold,
            cache_threshold=args.router_cache_threshold, max_tree_size=args.router_max_tree_size)
        self.metrics = RouterMetrics()
        for w in self.workers:
            self.metrics.worker_up.labels(w.url).set(0)
            self.metrics.in_flight.labels(w.url).set(0)
        connect = min(_CONNECT_TIMEOUT_S, args.health_check_timeout, args.request_timeout)
        # Streams hold a connection each: no pool cap, or long generations would queue others.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=connect),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                                        transport=transport)
        self.probe_client = httpx.AsyncClient(timeout=args.health_check_timeout, transport=transport)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.probe_client.aclose()

    # -- health ----------------------------------------------------------------------------------
    def set_health(self, i: int, healthy: bool, reason: str = "") -> None:
        w = self.workers[i]
        if healthy and not w.healthy:
            logger.info("worker %s is up", w.url)
        elif not healthy and w.healthy:
            logger.warning("worker %s is down: %s", w.url, reason)
            self.balancer.remove_worker(i)      # its cache may be gone; start its tree afresh
        if not healthy:
            w.last_error = reason
        w.healthy = healthy
        self.metrics.worker_up.labels(w.url).set(int(healthy))

    async def check_health(self) -> None:
        """Probe every worker's GET /health once, concurrently."""
        async def probe(i: int) -> None:
            url = self.workers[i].url
            try:
                r = await self.probe_client.get(url + "/health")
                ok, reason = r.status_code == 200, f"GET /health answered {r.status_code}"
            except httpx.TimeoutException:
                ok, reason = False, f"GET /health gave no answer within {self.args.health_check_timeout:g}s"
            except httpx.HTTPError as e:
                ok, reason = False, f"GET /health failed: {_describe(e)}"
            self.set_health(i, ok, reason)

        await asyncio.gather(*(probe(i) for i in range(len(self.workers))))

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.health_check_interval)
            await self.check_health()

    # -- proxying --------------------------------------------------------------------------------
    def pick(self, key: Sequence[Hashable], exclude: Sequence[int] = ()) -> int:
        alive = [w.healthy and i not in exclude for i, w in enumerate(self.workers)]
        i = self.balancer.pick(key, [w.in_flight for w in self.workers], alive)
        self.balancer.on_routed(i, key)
        return i

    def _begin(self, i: int) -> Worker:
        w = self.workers[i]
        w.in_flight += 1
        w.requests += 1
        self.metrics.requests.labels(w.url).inc()
        self.metrics.in_flight.labels(w.url).set(w.in_flight)
        return w

    def _end(self, i: int) -> None:
        w = self.workers[i]
        w.in_flight -= 1
        self.metrics.in_flight.labels(w.url).set(w.in_flight)

    def _failed(self, i: int, kind: str, e: BaseException) -> str:
        """Count a failed request, take the worker out of rotation unless it only was slow;
        the message for the client."""
        w = self.workers[i]
        message = f"worker {w.url} failed: {_describe(e)}"
        w.errors += 1
        self.metrics.errors.labels(w.url, kind).inc()
        if kind == "timeout":
            return f"worker {w.url} did not answer within --request-timeout {self.args.request_timeout:g}s"
        self.set_health(i, False, message)
        return message

    async def forward(self, request: Request, path: str) -> Response:
        """Proxy one generation request (POST path) to a worker, streaming or not. A client that
        goes away before the answer starts closes the upstream request too, so the worker
        aborts the generation instead of finishing it for nobody."""
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                                "Content-Type: application/json", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(400, f"the request body must be a JSON object, got "
                                f"{'nothing' if payload is None else type(payload).__name__}", code="invalid_json")
        headers = {"content-type": "application/json"}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        exchange = asyncio.ensure_future(
            self._exchange(path, body, headers, routing_key(path, payload), payload.get("stream") is True))
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({exchange, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not exchange.done():
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exchange
            return Response(status_code=499)        # nobody is listening any more
        return exchange.result()

    async def _exchange(self, path: str, body: bytes, headers: dict[str, str], key: Sequence[Hashable],
                        stream: bool) -> Response:
        """Send to a picked worker (once more to another if the connection failed) and answer
        with its response: relayed as it comes for a stream, read whole otherwise."""
        tried: list[int] = []
        while True:
            i = self._pick_or_fail(key, tried)
            w = self._begin(i)
            upstream = self.client.build_request("POST", w.url + path, content=body, headers=headers)
            try:
                resp = await self.client.send(upstream, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self._end(i)
                message = self._failed(i, "connect", e)
                tried.append(i)
                if len(tried) < 2 and any(x.healthy for x in self.workers):
                    self.metrics.retries.inc()
                    logger.warning("%s; retrying on another worker", message)
                    continue
                return _error(502, message, "bad_gateway")
            except BaseException as e:
                self._end(i)
                return self._upstream_error(i, e)
            break
        if stream and resp.status_code == 200 \
                and resp.headers.get("content-type", "").startswith("text/event-stream"):
            return SSEResponse(self._relay(i, resp))
        try:
            content = await resp.aread()
        except BaseException as e:
            return self._upstream_error(i, e)
        finally:
            await resp.aclose()
            self._end(i)
        return Response(content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    def _pick_or_fail(self, key: Sequence[Hashable], tried: list[int]) -> int:
        try:
            return self.pick(key, tried)
        except NoWorkerAvailable:
            raise self._no_worker() from None

    def _no_worker(self) -> APIError:
        self.metrics.no_worker.inc()
        down = "; ".join(f"{w.url}: {w.last_error or 'not checked yet'}" for w in self.workers)
        # code is the HTTP status, as in the router's 502 and 504 bodies
        return APIError(503, f"no healthy worker to serve the request ({down})", type="service_unavailable",
                        code=503)  # type: ignore[arg-type]

    def _upstream_error(self, i: int, e: BaseException) -> Response:
        if isinstance(e, httpx.TimeoutException):
            return _error(504, self._failed(i, "timeout", e), "gateway_timeout")
        if isinstance(e, httpx.HTTPError):
            return _error(502, self._failed(i, "disconnect", e), "bad_gateway")
        raise e

    async def _relay(self, i: int, resp: httpx.Response) -> AsyncIterator[bytes]:
        """The worker's SSE bytes as they come; if the worker fails mid-stream, an error event
        and [DONE], so that clients end cleanly with a reason instead of hanging."""
        ended_clean = True
        try:
            async for chunk in resp.aiter_bytes():
                ended_clean = chunk.endswith(b"\n\n")
                yield chunk
        except httpx.HTTPError as e:
            kind = "timeout" if isinstance(e, httpx.TimeoutException) else "disconnect"
            message = self._failed(i, kind, e)
            event = sse(error_body(message, "bad_gateway" if kind == "disconnect" else "gateway_timeout",
                                   code=502 if kind == "disconnect" else 504))
            yield (b"" if ended_clean else b"\n\n") + event + SSE_DONE
        finally:
            await resp.aclose()
            self._end(i)

    async def forward_get(self, path: str, request: Request) -> Response:
        """A read-only GET (e.g. /v1/models) answered by the first healthy worker that can."""
        headers = {k: v for k, v in request.headers.items() if k == "authorization"}
        last = ""
        for i, w in enumerate(self.workers):
            if not w.healthy:
                continue
            try:
                r = await self.client.get(w.url + path, headers=headers)
            except httpx.HTTPError as e:
                last = self._failed(i, "timeout" if isinstance(e, httpx.TimeoutException) else "connect", e)
                continue
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type", "application/json"))
        if last:
            return _error(502, last, "bad_gateway")
        raise self._no_worker()

    def workers_info(self) -> list[dict[str, Any]]:
        trees = getattr(self.balancer, "trees", None)
        return [{"url": w.url, "healthy": w.healthy, "in_flight": w.in_flight, "requests": w.requests,
                 "errors": w.errors, "last_error": w.last_error or None,
                 **({"tree_size": trees[i].size} if trees else {})}
                for i, w in enumerate(self.workers)]


def _error(status: int, message: str, type: str) -> JSONResponse:
    return JSONResponse(error_body(message, type, code=status), status_code=status)


def build_router_app(router: Router) -> FastAPI:
    """The router's FastAPI app; its lifespan probes the workers once, then every
    --health-check-interval seconds."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.check_health()
        up = [w.url for w in router.workers if w.healthy]
        logger.info("%d of %d workers healthy at start%s", len(up), len(router.workers),
                    f": {', '.join(up)}" if up else "; waiting for them")
        task = asyncio.create_task(router.health_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await router.aclose()

    app = FastAPI(title="anyserve router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)

    for path in GENERATION_ROUTES:
        async def generate(request: Request, path: str = path) -> Response:
            return await router.forward(request, path)
        app.add_api_route(path, generate, methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await router.forward_get("/v1/models", request)

    @app.get("/health")
    async def health() -> Response:
        if not any(w.healthy for w in router.workers):
            return _error(503, f"none of the {len(router.workers)} workers is healthy", "service_unavailable")
        return Response(status_code=200)

    @app.get("/workers")
    async def workers() -> dict[str, Any]:
        return {"load_balance_method": router.args.load_balance_method, "workers": router.workers_info()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ApiKeyMiddleware, api_key=router.args.api_key)
    app.add_middleware(CatchAllMiddleware)
    return app


def run_router(args: RouterArgs) -> int:
    """Serve until Ctrl-C / SIGTERM (exit 0)."""
    import uvicorn

    from engine.entrypoints.logging_setup import setup_logging

    setup_logging(args.log_level)
    router = Router(args)
    app = build_router_app(router)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))

    async def serve() -> bool:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        await server.serve()
        return server.started

    logger.info("router: %d workers, load balancing %s, http://%s:%d", len(router.workers),
                args.load_balance_method, args.host, args.port)
    if not asyncio.run(serve()):
        logger.error("the router could not start on %s:%d", args.host, args.port)
        return 1
    logger.info("stopped")
    return 0
