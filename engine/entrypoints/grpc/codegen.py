"""Python stubs for anyserve.proto, generated at import time and cached by the proto's hash.

The repository keeps only the .proto. ``load_stubs()`` runs ``grpc_tools.protoc`` into
``<cache>/grpc/<hash>/`` (once per proto text and protobuf/grpc version, safe across threads
and processes: it writes a temporary folder and renames it into place) and imports the result.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import google.protobuf
import grpc

logger = logging.getLogger(__name__)

PROTO_PATH = Path(__file__).with_name("anyserve.proto")

_lock = threading.Lock()
_loaded: Optional[tuple[ModuleType, ModuleType]] = None


def cache_root() -> Path:
    """$ANYSERVE_CACHE/grpc, else a per-user folder under the system temp dir."""
    base = os.environ.get("ANYSERVE_CACHE")
    if base:
        return Path(base) / "grpc"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"anyserve-cache-{uid}" / "grpc"


def proto_hash(proto_path: Path) -> str:
    """Key of the generated code: the proto text and the versions the code is tied to."""
    h = hashlib.sha256(proto_path.read_bytes())
    h.update(f"protobuf={google.protobuf.__version__};grpc={grpc.__version__}".encode())
    return h.hexdigest()[:20]


def generate(proto_path: Path = PROTO_PATH, root: Optional[Path] = None) -> Path:
    """Return the folder holding ``<name>_pb2.py`` and ``<name>_pb2_grpc.py`` for this proto,
    running protoc only when that folder does not exist yet."""
    proto_path = Path(proto_path).resolve()
    root = Path(root) if root is not None else cache_root()
    out = root / proto_hash(proto_path)
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_path.parent}",
               f"--python_out={tmp}", f"--grpc_python_out={tmp}", proto_path.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed on {proto_path} (exit {done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}; fix the .proto and retry")
        try:
            os.rename(tmp, out)      # atomic: readers see a complete folder or none
            logger.info("generated gRPC stubs for %s in %s", proto_path.name, out)
        except OSError:
            if not out.is_dir():     # not another writer winning the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    # The _grpc module does `import anyserve_pb2`, so the message module must be registered
    # under its plain name before the service module runs.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """(anyserve_pb2, anyserve_pb2_grpc), generated if needed and imported once per process."""
    global _loaded
    with _lock:
        if _loaded is None:
            folder = generate()
            stem = PROTO_PATH.stem
            pb2 = sys.modules.get(f"{stem}_pb2") or _import(f"{stem}_pb2", folder / f"{stem}_pb2.py")
            pb2_grpc = (sys.modules.get(f"{stem}_pb2_grpc")
                        or _import(f"{stem}_pb2_grpc", folder / f"{stem}_pb2_grpc.py"))
            _loaded = (pb2, pb2_grpc)
        return _loaded
