"""Registries of implementations by role: attention, sampling, collectives, graph_runner, layer_ops.

Backends call ``register(role, name, factory, platforms=..., available=...)``; the engine
calls ``select(role, platform, requested)`` and gets the factory plus a reason to log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from hal.platform import Platform

ROLES = ("attention", "sampling", "collectives", "graph_runner", "piecewise_graph_runner", "layer_ops")


class BackendSelectionError(RuntimeError):
    """The requested implementation cannot run on this platform or install."""


@dataclass
class Entry:
    role: str
    name: str
    factory: Callable
    platforms: frozenset[str]
    available: Callable[[], bool]
    requires: str = ""  # what to install when available() is false
    # what the implementation can do beyond its role's basics, e.g. "fp8_kv_cache" (attention
    # reading and writing a KV pool of 8-bit floats); select(needs=...) skips those without it
    features: frozenset[str] = frozenset()


_REGISTRY: dict[str, dict[str, Entry]] = {r: {} for r in ROLES}


def register(role: str, name: str, factory: Callable, *, platforms: Iterable[str],
             available: Callable[[], bool] = lambda: True, requires: str = "",
             features: Iterable[str] = ()) -> None:
    if role not in _REGISTRY:
        raise ValueError(f"unknown role {role!r}; roles: {ROLES}")
    _REGISTRY[role][name] = Entry(role, name, factory, frozenset(platforms), available, requires,
                                  frozenset(features))


def entries(role: str) -> dict[str, Entry]:
    from hal.plugins import load_backends

    load_backends()
    return dict(_REGISTRY[role])


def _preference(role: str, platform: Platform) -> tuple[str, ...]:
    """The platform's ``<role>_preference`` when it has one, else registration order."""
    preference = getattr(platform, f"{role}_preference", None)
    if preference is not None:
        return tuple(preference)
    return tuple(n for n, e in entries(role).items() if platform.name in e.platforms)


def select(role: str, platform: Platform, requested: Optional[str] = None,
           needs: Optional[dict[str, str]] = None) -> tuple[Entry, str]:
    """Return (entry, reason). A requested name that cannot run is an error, never a fallback.
    ``needs`` maps features the choice must have to the flag that asks for each."""
    table = entries(role)
    needs = needs or {}

    def lacking(entry: Entry) -> list[str]:
        return [f"{feature} (asked for by {flag})" for feature, flag in needs.items()
                if feature not in entry.features]

    if requested:
        entry = table.get(requested)
        flag = f"--{role.replace('_', '-')}-backend {requested}"
        if entry is None:
            known = ", ".join(sorted(table)) or "none"
            raise BackendSelectionError(f"{flag}: unknown {role} backend; registered: {known}")
        if platform.name not in entry.platforms:
            raise BackendSelectionError(
                f"{flag}: does not run on {platform.name} (runs on {', '.join(sorted(entry.platforms))})")
        if not entry.available():
            hint = f"; install {entry.requires}" if entry.requires else ""
            raise BackendSelectionError(f"{flag}: not available in this install{hint}")
        if lacking(entry):
            able = sorted(n for n, e in table.items() if platform.name in e.platforms and not lacking(e))
            raise BackendSelectionError(f"{flag}: cannot do {', '.join(lacking(entry))}; on {platform.name} "
                                        f"these can: {', '.join(able) or 'none'}")
        return entry, "requested"
    skipped = []
    for name in _preference(role, platform):
        entry = table.get(name)
        if entry is None or platform.name not in entry.platforms:
            continue
        if lacking(entry):
            skipped.append(f"{name} cannot do {', '.join(lacking(entry))}")
            continue
        if entry.available():
            why = "platform preference" + (f" ({'; '.join(skipped)})" if skipped else "")
            return entry, why
        skipped.append(f"{name} unavailable")
    raise BackendSelectionError(f"no {role} backend available for platform {platform.name}"
                                + (f" ({'; '.join(skipped)})" if skipped else ""))
