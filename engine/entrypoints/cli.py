"""The ``anyserve`` command: serve, make-model, bench offline|serving."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

_DESCRIPTION = """anyserve: one LLM serving engine for every accelerator vendor and plain CPUs.

  anyserve serve [--model-path DIR] [--device auto|DEVICE] ...
  anyserve router --worker-urls URL [URL ...] [--load-balance-method cache_aware] ...
  anyserve make-model --arch llama --size tiny OUT_DIR
  anyserve bench offline ...        anyserve bench serving ...

Run 'anyserve COMMAND --help' for a command's flags."""


def _parser() -> argparse.ArgumentParser:
    from engine.server_args import ServerArgs

    p = argparse.ArgumentParser(prog="anyserve", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version="anyserve 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="Start the OpenAI-compatible, SGLang-native and gRPC server.",
                           description="Start the server: HTTP (OpenAI /v1 and SGLang-native routes) and "
                           "gRPC in front of a scheduler process that owns the device.")
    ServerArgs.add_cli_args(serve)

    router = sub.add_parser(
        "router", help="Route requests over several 'anyserve serve' workers (cache-aware).",
        description="Serve the OpenAI and native APIs in front of several 'anyserve serve' workers: "
        "each generation goes to one worker picked by --load-balance-method (streams pass through), "
        "workers failing GET /health are taken out of rotation until they recover, and a worker "
        "failing mid-request ends that request with a 502 error. GET /workers lists the workers "
        "with their health and load; /metrics has the router's own counters.")
    from engine.router.args import RouterArgs

    RouterArgs.add_cli_args(router)

    mm = sub.add_parser("make-model", help="Write a random-weight checkpoint of a real architecture.",
                        description="Write a Hugging Face checkpoint with random weights and a locally "
                        "trained tokenizer (for tests, demos and CPU benchmarks).")
    from engine.models.make_model import add_make_model_args

    add_make_model_args(mm)

    bench = sub.add_parser("bench", help="Benchmarks: offline throughput, serving load.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    off = bsub.add_parser("offline", help="Offline throughput of anyserve against transformers.",
                          description="Run one workload through the offline Engine and through "
                          "transformers' generate in static batches; print tokens/s and the ratio.")
    from engine.bench.offline import add_bench_offline_args

    add_bench_offline_args(off)
    srv = bsub.add_parser("serving", help="Load generator against a running server.",
                          description="Send a dataset of requests to a running server and report "
                          "throughput, TTFT, ITL and end-to-end latency.")
    from engine.bench.serving import add_bench_serving_args

    add_bench_serving_args(srv)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from engine.entrypoints.launch_server import launch_server
        from engine.server_args import ServerArgs

        try:
            server_args = ServerArgs.from_cli_args(args)
        except ValueError as e:
            parser.error(str(e))
        return launch_server(server_args)
    if args.command == "router":
        from engine.router.args import RouterArgs
        from engine.router.server import run_router

        try:
            router_args = RouterArgs.from_cli_args(args)
        except ValueError as e:
            parser.error(str(e))
        return run_router(router_args)
    if args.command == "make-model":
        from engine.models.make_model import run_make_model

        run_make_model(args)
        return 0
    if args.command == "bench":
        if args.bench_command == "offline":
            from engine.bench.offline import run_bench_offline

            run_bench_offline(args)
            return 0
        if args.bench_command == "serving":
            from engine.bench.serving import run_bench_serving

            run_bench_serving(args)
            return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
