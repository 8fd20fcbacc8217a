"""Every flag of ``anyserve router`` in one dataclass, with the command line generated from it.

The cache-aware thresholds are the same flags as ``anyserve serve --dp``'s: their defaults and
help text are taken from ServerArgs, so each exists once.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.server_args import LOAD_BALANCE_METHODS, ServerArgs, check_router_thresholds

_SERVER_FIELDS = {f.name: f for f in dataclasses.fields(ServerArgs)}


def _opt(default: Any, help: str, choices: Optional[list] = None, **argparse_kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "argparse": argparse_kw})


def _from_server_args(name: str) -> Any:
    f = _SERVER_FIELDS[name]
    return _opt(f.default, f.metadata["help"], f.metadata.get("choices"))


@dataclass
class RouterArgs:
    worker_urls: list[str] = _opt(
        None, "Base URLs of the 'anyserve serve' workers to route over, e.g. http://10.0.0.1:30000 "
        "http://10.0.0.2:30000.", nargs="+", required=True, metavar="URL")
    host: str = _opt("127.0.0.1", "HTTP host the router listens on.")
    port: int = _opt(30000, "HTTP port the router listens on.")
    load_balance_method: str = _opt(
        "cache_aware", "How a worker is picked per request: round_robin, shortest_queue (fewest "
        "requests in flight through this router) or cache_aware (the worker whose approximate "
        "tree of routed prompts shares the longest prefix, unless the load is out of balance).",
        list(LOAD_BALANCE_METHODS))
    router_balance_abs_threshold: int = _from_server_args("router_balance_abs_threshold")
    router_balance_rel_threshold: float = _from_server_args("router_balance_rel_threshold")
    router_cache_threshold: float = _from_server_args("router_cache_threshold")
    router_max_tree_size: int = _from_server_args("router_max_tree_size")
    health_check_interval: float = _opt(
        2.0, "Seconds between two GET /health probes of each worker; a worker that fails one is "
        "taken out of rotation until a probe succeeds again.")
    health_check_timeout: float = _opt(2.0, "Seconds a health probe (and a connection attempt) "
                                       "may take before the worker counts as down.")
    request_timeout: float = _opt(
        600.0, "Seconds the router waits for a worker's answer (for a stream, for its next "
        "bytes) before failing the request with 504.")
    api_key: Optional[str] = _opt(
        None, "Require 'Authorization: Bearer <key>' from clients (except /health and /metrics). The "
        "header is forwarded, so workers started with the same --api-key accept it.")
    log_level: str = _opt("info", "Logging level.", ["debug", "info", "warning", "error"])

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(flag: str, msg: str) -> None:
            raise ValueError(f"--{flag.replace('_', '-')} {msg}")

        if not self.worker_urls:
            bad("worker_urls", "needs at least one URL")
        for url in self.worker_urls:
            if not url.startswith(("http://", "https://")):
                bad("worker_urls", f"must be http:// or https:// URLs, got {url!r}")
        if len({u.rstrip('/') for u in self.worker_urls}) != len(self.worker_urls):
            bad("worker_urls", f"lists a worker twice: {self.worker_urls}")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            bad("load_balance_method", f"must be one of {LOAD_BALANCE_METHODS}, got {self.load_balance_method!r}")
        check_router_thresholds(self, bad)
        for name in ("health_check_interval", "health_check_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = f.default
            help_text = meta["help"] + ("" if default is None else f" (default: {default})")
            kw = dict(meta["argparse"])
            kw.setdefault("type", {"int": int, "float": float}.get(str(f.type), str))
            kw.setdefault("metavar", None if meta["choices"] else f.name.upper())
            parser.add_argument("--" + f.name.replace("_", "-"), default=default, choices=meta["choices"],
                                help=help_text, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "RouterArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
