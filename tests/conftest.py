"""Shared fixtures of the whole suite: the tiny random-weight checkpoints, made once per test session, and a
private cache folder so that no test reads or writes the user's ~/.cache/anyserve.

Use `make_tiny(arch, **make_model_kwargs)` (also a fixture of that name) for a variant, or the fixtures
`llama_tiny`, `mistral_tiny`, `qwen2_tiny`, `qwen3_tiny` (a Path each) and `tiny_model` ((arch, Path),
parametrized over the four dense archs; the mixture-of-experts ones are tests/test_moe.py's).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from engine.models.make_model import DENSE_ARCHS, make_model

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="anyserve-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
os.environ.setdefault("ANYSERVE_CACHE", str(_SESSION_DIR / "cache"))

_made: dict[tuple, Path] = {}
_made_lock = threading.Lock()


def make_tiny(arch: str, **kw) -> Path:
    """The tiny `arch` checkpoint made with make_model(arch, "tiny", ..., **kw), made once per session for
    each distinct (arch, kw). Treat the folder as read-only: other tests share it."""
    key = (arch, tuple(sorted(kw.items())))
    with _made_lock:
        if key not in _made:
            name = "-".join([f"tiny-{arch}"] + [f"{k}={v}" for k, v in key[1]])
            _made[key] = make_model(arch, "tiny", _SESSION_DIR / "models" / name, **kw)
        return _made[key]


@pytest.fixture(name="make_tiny", scope="session")
def _make_tiny_fixture():
    return make_tiny


@pytest.fixture(scope="session")
def llama_tiny() -> Path:
    return make_tiny("llama")


@pytest.fixture(scope="session")
def mistral_tiny() -> Path:
    return make_tiny("mistral")


@pytest.fixture(scope="session")
def qwen2_tiny() -> Path:
    return make_tiny("qwen2")


@pytest.fixture(scope="session")
def qwen3_tiny() -> Path:
    return make_tiny("qwen3")


@pytest.fixture(scope="session", params=DENSE_ARCHS)
def tiny_model(request) -> tuple[str, Path]:
    return request.param, make_tiny(request.param)


@pytest.fixture
def break_import(monkeypatch):
    """break_import("pkg", "libfoo.so: ...") makes ``import pkg`` raise that ImportError, as an
    installed package whose native library fails to load does."""
    import builtins

    real_import = builtins.__import__

    def install(package: str, message: str) -> None:
        def fake_import(name, *args, **kw):
            if name == package:
                raise ImportError(message)
            return real_import(name, *args, **kw)

        monkeypatch.setattr(builtins, "__import__", fake_import)
    return install
