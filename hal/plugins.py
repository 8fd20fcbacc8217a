"""Import every folder under ``backends/`` once, so each vendor registers what it provides.

A new vendor is a new folder: nothing here or in ``engine/`` names it.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

logger = logging.getLogger(__name__)
_loaded = False


def load_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import backends

    for mod in sorted(pkgutil.iter_modules(backends.__path__), key=lambda m: m.name):
        if not mod.ispkg:
            continue
        try:
            importlib.import_module(f"backends.{mod.name}")
        except Exception as e:  # a broken optional backend must not take the others down
            logger.warning("backend %s failed to register: %s", mod.name, e)
