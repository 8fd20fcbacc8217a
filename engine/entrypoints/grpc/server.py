"""The gRPC front end: the ``anyserve.v1.Anyserve`` service over the TokenizerManager.

Runs on grpcio's asyncio server in the front-end process, beside the HTTP server, on the same
event loop and TokenizerManager. Stubs come from anyserve.proto via codegen.py.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Awaitable, Callable

import grpc

from engine.entrypoints.fanout import FanOut
from engine.entrypoints.grpc.codegen import load_stubs
from engine.entrypoints.grpc.convert import SampleStream, to_generate_requests
from engine.io_struct import GenerateRequest
from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)

pb2, pb2_grpc = load_stubs()

_MAX_MESSAGE_BYTES = 64 << 20        # long token-id prompts; gRPC's default is 4 MiB
_HEALTH_GENERATE_TIMEOUT_S = 20.0


class AnyserveServicer(pb2_grpc.AnyserveServicer):
    def __init__(self, tokenizer_manager: Any, server_args: ServerArgs):
        self.tm = tokenizer_manager
        self.server_args = server_args
        self._running: dict[str, list[str]] = {}     # client rid -> the samples' rids

    # ---- Generate ---------------------------------------------------------------------------
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing with context.write (not an async generator): when the client
        # cancels, CancelledError lands in this frame and the finally blocks below close the
        # TokenizerManager generators at once, which aborts the requests in the scheduler.
        await self._check_alive(context)
        rid = request.rid or self.tm.new_rid()
        if rid in self._running:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"rid {rid!r} is already running; use a unique rid or leave it empty")
        try:
            reqs = to_generate_requests(request, rid)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._running[rid] = [r.rid for r in reqs]
        try:
            error = await self._stream_samples(rid, reqs, context)
        finally:
            del self._running[rid]
        if isinstance(error, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if error is not None:
            if not self.tm.is_alive():
                await context.abort(grpc.StatusCode.UNAVAILABLE, _DEAD_MESSAGE)
            logger.exception("gRPC Generate %s failed", rid, exc_info=error)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    async def _stream_samples(self, rid: str, reqs: list[GenerateRequest],
                              context: grpc.aio.ServicerContext) -> BaseException | None:
        """Run every sample concurrently and write their messages as they come (interleaved,
        tagged by index). Returns the first sample's error, if any, after stopping the rest."""
        streams = [SampleStream(pb2, rid, i) for i in range(len(reqs))]
        fan = FanOut(self.tm, reqs)
        try:
            async for i, out in fan.updates():
                msg = streams[i].delta(out)
                if msg is not None:
                    await context.write(msg)
            return None
        except Exception as e:               # handed back, mapped to a status by the caller
            return e
        finally:
            fan.close()

    # ---- Health, model info, abort ------------------------------------------------------------
    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_alive(context)
        if request.check_generate:
            try:
                await asyncio.wait_for(self._generate_one_token(), _HEALTH_GENERATE_TIMEOUT_S)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "health check: a one-token generation "
                                    f"did not finish within {_HEALTH_GENERATE_TIMEOUT_S:.0f}s")
            except Exception as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"health check: generation failed: {type(e).__name__}: {e}")
        return pb2.HealthResponse(serving=True)

    async def _generate_one_token(self) -> None:
        bos = getattr(getattr(self.tm, "tokenizer", None), "bos_token_id", None)
        req = GenerateRequest(input_ids=[bos if bos is not None else 0], rid=f"health-{self.tm.new_rid()}",
                              sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        async for _ in self.tm.generate(req):
            pass

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_alive(context)
        tm, info = self.tm, self.tm.scheduler_info
        return pb2.GetModelInfoResponse(
            model_path=tm.model_path or "",
            tokenizer_path=tm.server_args.tokenizer_path or tm.model_path or "",
            served_model_name=tm.served_model_name,
            context_length=tm.context_len,
            vocab_size=tm.vocab_size,
            is_generation=True,
            device=info.device,
            dtype=info.dtype,
            max_total_tokens=info.max_total_tokens,
            max_running_requests=info.max_running_requests,
            attention_backend=info.attention_backend,
            sampling_backend=info.sampling_backend,
        )

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rid: give the rid of the request to abort")
        # Requests started here may have n samples; others (e.g. over HTTP) are aborted by rid.
        for rid in self._running.get(request.rid, [request.rid]):
            self.tm.abort_request(rid)
        return pb2.AbortResponse()

    async def _check_alive(self, context: grpc.aio.ServicerContext) -> None:
        if not self.tm.is_alive():
            await context.abort(grpc.StatusCode.UNAVAILABLE, _DEAD_MESSAGE)


_DEAD_MESSAGE = "the scheduler process has died, so this server cannot serve requests; see its log and restart it"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without metadata ``authorization: Bearer <--api-key>``."""

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler
        return _unauthenticated_handler(handler)


def _unauthenticated_handler(handler: Any) -> Any:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata 'authorization: Bearer <key>' "
                            "with the key the server was started with (--api-key)")

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


async def start_grpc_server(tokenizer_manager: Any, server_args: ServerArgs, port: int) -> grpc.aio.Server:
    """Start the gRPC server on server_args.host:port, on the running event loop.
    Stop it with ``await server.stop(grace_seconds)``."""
    interceptors = [ApiKeyInterceptor(server_args.api_key)] if server_args.api_key else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),        # a port in use must fail here, not be shared silently
    ])
    pb2_grpc.add_AnyserveServicer_to_server(AnyserveServicer(tokenizer_manager, server_args), server)
    host = server_args.host
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        bound, reason = 0, str(e)
    else:
        reason = "bind failed"
    if bound == 0:
        raise RuntimeError(f"gRPC server could not listen on {address} ({reason}): is the port in use? "
                           "Choose another with --grpc-port, or --grpc-port 0 to turn gRPC off")
    await server.start()
    logger.info("gRPC server (anyserve.v1.Anyserve) listening on %s:%d%s", host, bound,
                ", API key required" if server_args.api_key else "")
    return server
