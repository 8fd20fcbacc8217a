"""anyserve's engine: scheduler, memory, models, runner and front ends (no vendor code here)."""
from typing import Any

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str) -> Any:  # lazy: importing engine.* submodules stays cheap
    if name == "Engine":
        from engine.entrypoints.engine import Engine

        return Engine
    if name == "ServerArgs":
        from engine.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
