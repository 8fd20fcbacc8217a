"""``anyserve serve``: the front-end process (HTTP + gRPC + TokenizerManager) and the
scheduler process behind it."""
from __future__ import annotations

import asyncio
import logging
import signal

from engine.entrypoints.engine import resolve_model_path
from engine.entrypoints.logging_setup import setup_logging
from engine.server_args import ServerArgs

logger = logging.getLogger("anyserve")

# After the scheduler dies, keep answering 503 this long before exiting.
_DEAD_GRACE_SECONDS = 1.0


def launch_server(args: ServerArgs) -> int:
    """Run until Ctrl-C / SIGTERM (exit 0) or until the scheduler dies (exit 1)."""
    setup_logging(args.log_level)
    try:
        args.model_path = resolve_model_path(args.model_path)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    if args.node_rank > 0:   # a later node of a multi-node tensor-parallel group: ranks only
        from engine.entrypoints.scheduler_process import run_node_workers

        return run_node_workers(args)
    from engine.entrypoints.dp_client import make_scheduler_client

    logger.info("starting the scheduler for %s", args.model_path)
    try:
        client = make_scheduler_client(args, "process")
    except (RuntimeError, TimeoutError) as e:
        logger.error("%s", e)
        return 1
    try:
        return asyncio.run(_serve(args, client))
    finally:
        client.shutdown()


async def _serve(args: ServerArgs, client) -> int:
    import uvicorn

    from engine.entrypoints.http_server import build_app
    from engine.entrypoints.metrics import ServerMetrics
    from engine.entrypoints.tokenizer_manager import TokenizerManager

    info = client.info
    metrics = ServerMetrics() if args.enable_metrics else None
    tm = TokenizerManager(args, client, info, metrics)
    tm.attach_loop(asyncio.get_running_loop())
    app = build_app(tm, args)

    grpc_server = None
    grpc_port = args.effective_grpc_port
    if grpc_port:
        from engine.entrypoints.grpc.server import start_grpc_server

        grpc_server = await start_grpc_server(tm, args, grpc_port)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    exit_code = 0

    async def watch() -> None:
        nonlocal exit_code
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        logger.info("model %s: device=%s dtype=%s attention=%s sampling=%s kv_capacity=%d tokens "
                    "max_running_requests=%d context=%d", tm.served_model_name, info.device, info.dtype,
                    info.attention_backend, info.sampling_backend, info.max_total_tokens,
                    info.max_running_requests, info.context_length)
        ctx = app.state.ctx
        logger.info("chat: tool-call parser %s, reasoning parser %s, grammar backend %s",
                    ctx.tool_parser_name or "none (tool calls are not parsed)",
                    ctx.reasoning_parser_name or "none (answers are not split)", args.grammar_backend)
        logger.info("ready: http://%s:%d (OpenAI /v1, native /generate)%s", args.host, args.port,
                    f", gRPC {args.host}:{grpc_port}" if grpc_server else "")
        while not server.should_exit:
            if not tm.is_alive():
                logger.error("the scheduler is gone; answering 503 for %.0fs, then exiting",
                             _DEAD_GRACE_SECONDS)
                await asyncio.sleep(_DEAD_GRACE_SECONDS)
                exit_code = 1
                server.should_exit = True
                return
            await asyncio.sleep(0.2)
        # Stopping (Ctrl-C, SIGTERM): end the requests in flight so their streams close cleanly
        # within uvicorn's graceful-shutdown window.
        aborted = tm.abort_all()
        if aborted:
            logger.info("stopping: aborted %d request(s) in flight", len(aborted))

    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers that
    # is a no-op, so gRPC and the scheduler are stopped too and the exit code is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=1)
    if not server.started:
        logger.error("the HTTP server could not start on %s:%d", args.host, args.port)
        return 1
    logger.info("stopped")
    return exit_code

