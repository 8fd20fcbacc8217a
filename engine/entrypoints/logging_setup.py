"""One logging format for every anyserve process."""
from __future__ import annotations

import logging
import os

_FORMAT = "[%(asctime)s %(processName)s] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    if any(getattr(h, "_anyserve", False) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler._anyserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(os.environ.get("ANYSERVE_LOG_LEVEL", level).upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
