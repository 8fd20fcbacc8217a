"""Errors of the HTTP front end, always answered with OpenAI's body.

``{"error": {"message", "type", "param", "code"}}`` for every failure: our own APIError,
pydantic validation errors, unknown routes, and unexpected exceptions (500, logged, the
server keeps serving).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional

import pydantic
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A failure with an HTTP status, answered as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


@functools.lru_cache(maxsize=1)
def _known_params() -> frozenset[str]:
    from engine.entrypoints.openai import protocol
    from engine.sampling.sampling_params import SamplingParams
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    for model in (protocol.ChatCompletionRequest, protocol.CompletionRequest, protocol.GenerateReqInput):
        names |= set(model.model_fields)
    return frozenset(names)


def from_value_error(e: ValueError) -> APIError:
    """ValueErrors from the protocol models, SamplingParams or the TokenizerManager mostly
    start with the field's name ("top_p must be in (0, 1], got 0"): that becomes `param`."""
    message = str(e) or "invalid request"
    first = message.split(" ", 1)[0].rstrip(":,").split("[", 1)[0]
    return APIError(400, message, param=first if first in _known_params() else None)


def _loc_to_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation_error(e: pydantic.ValidationError | RequestValidationError) -> APIError:
    """The first problem of a pydantic validation, named by its field path."""
    errors = e.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = tuple(p for p in err.get("loc", ()) if p != "body")
    field = _loc_to_str(loc)
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not field:       # a check across fields: the message starts with the field's name
        api = from_value_error(ValueError(msg))
    elif err.get("type") == "missing":
        api = APIError(400, f"{field} is required", param=field)
    else:
        api = APIError(400, msg if msg.startswith(field) else f"{field}: {msg}", param=field)
    if len(errors) > 1:
        api.message += f" (and {len(errors) - 1} more problem(s))"
    return api


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /v1/models, " \
                      "/v1/chat/completions, /v1/completions, /generate"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


class CatchAllMiddleware:
    """Turns an unexpected exception into a logged 500 with OpenAI's body, so that one bad
    request never takes the server down and never leaks a traceback to the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            err = APIError(500, f"internal error: {type(e).__name__}: {e}; the server keeps "
                                "serving, please report this with the request that caused it",
                           code="internal_error")
            await err.response()(scope, receive, send)
