"""The HTTP front end: OpenAI's /v1 routes, /v1/tokenize and /v1/detokenize, SGLang's native
routes and Prometheus /metrics on one FastAPI app. `anyserve serve` builds it with `build_app`
and runs it with uvicorn.

With --api-key every route needs `Authorization: Bearer <key>` except /health,
/health_generate and /metrics (probes and scrapers usually cannot send one).
"""
from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from engine.entrypoints.native_api import build_native_router
from engine.entrypoints.openai.context import ApiContext, anyserve_version
from engine.entrypoints.openai.errors import APIError, CatchAllMiddleware, install_error_handlers
from engine.entrypoints.openai.protocol import ModelCard, ModelList
from engine.entrypoints.openai.serving_chat import create_chat_completion
from engine.entrypoints.openai.serving_completions import create_completion
from engine.entrypoints.openai.serving_tokenize import create_detokenize, create_tokenize
from engine.entrypoints.fanout import ClientDisconnected

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


def build_app(tokenizer_manager: Any, server_args: Any) -> FastAPI:
    ctx = ApiContext(tm=tokenizer_manager, server_args=server_args)
    app = FastAPI(title="anyserve", version=anyserve_version(), docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)

    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)        # nobody is listening any more

    app.add_exception_handler(ClientDisconnected, on_disconnect)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    # SGLang's paths, and vLLM's for the same thing
    @app.post("/v1/tokenize")
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await create_tokenize(ctx, request)

    @app.post("/v1/detokenize")
    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await create_detokenize(ctx, request)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[_model_card(ctx)]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        ctx.check_model(model)
        return _model_card(ctx).model_dump()

    if getattr(server_args, "enable_metrics", False):
        _add_metrics_route(app, ctx)

    app.include_router(build_native_router(ctx))
    app.add_middleware(ApiKeyMiddleware, api_key=getattr(server_args, "api_key", None))
    app.add_middleware(CatchAllMiddleware)     # outermost: nothing escapes as a bare 500
    return app


def _model_card(ctx: ApiContext) -> ModelCard:
    return ModelCard(id=ctx.served_model_name, created=ctx.created, root=ctx.tm.model_path,
                     max_model_len=ctx.tm.context_len)


def _add_metrics_route(app: FastAPI, ctx: ApiContext) -> None:
    tm = ctx.tm
    if getattr(tm, "metrics", None) is None:
        tm.metrics = ServerMetrics()            # the TokenizerManager reports into it

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            tm.metrics.update_scheduler_stats(await tm.get_stats())
        except Exception as e:  # noqa: BLE001 - stale gauges beat no metrics
            logger.warning("could not refresh scheduler stats for /metrics: %s", e)
        return Response(tm.metrics.render(), media_type=CONTENT_TYPE)


class ApiKeyMiddleware:
    """401 with OpenAI's body unless `Authorization: Bearer <api_key>` (paths in OPEN_PATHS
    are open). A no-op when the server has no API key."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.api_key or scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                   else "incorrect API key in the Authorization header")
        response: JSONResponse = APIError(401, message, code="invalid_api_key").response()
        await response(scope, receive, send)
