"""Importing aiter (github.com/ROCm/aiter) for the backends built on it: each role checks that the
functions it calls are there, and an installed aiter that cannot be used is a clear error when asked
for and a logged skip (for Triton) when the platform only prefers it."""
from __future__ import annotations

import logging
from types import ModuleType

logger = logging.getLogger(__name__)


def import_aiter(user: str, functions: tuple[str, ...], instead: str) -> ModuleType:
    """The aiter module, or a RuntimeError naming ``user`` (who asked) and ``instead`` (what to do)
    when it fails to import or lacks one of ``functions``."""
    try:
        import aiter
    except Exception as e:  # ImportError, or a HIP/JIT dependency failing at import time
        raise RuntimeError(f"{user}: aiter is installed but failed to import "
                           f"({type(e).__name__}: {e})") from e
    missing = [f"aiter.{n}" for n in functions if not callable(getattr(aiter, n, None))]
    if missing:
        raise RuntimeError(f"{user}: this aiter has no {', '.join(missing)} (written against ROCm/aiter "
                           f"main of 2025-26); update aiter or {instead}")
    return aiter


def usable(user: str, functions: tuple[str, ...], instead: str) -> bool:
    """Whether import_aiter succeeds; when not, its reason is logged (the caller then skips aiter)."""
    try:
        import_aiter(user, functions, instead)
    except RuntimeError as e:
        logger.warning("%s", e)
        return False
    return True
