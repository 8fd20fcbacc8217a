"""``import anyserve; anyserve.Engine(...)``: the public entry points under the project's name."""
from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "ServerArgs", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "ServerArgs"):
        import engine

        return getattr(engine, name)
    raise AttributeError(name)
