"""Builds a model on its device and fills its weights: from safetensors (one file or a sharded
index), or random of the real shape (``--load-format dummy``, for benchmarks)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from engine.layers.layernorm import RMSNorm
from engine.layers.parallel_state import get_tp_rank, get_tp_size
from engine.models.config import ModelConfig
from engine.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
INDEX_FILE = "model.safetensors.index.json"


class WeightLoadError(RuntimeError):
    """The checkpoint's tensors do not fit the model config.json describes."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(config: ModelConfig, load_format: str = "auto", device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of ``config.architecture``, built on ``device`` in ``dtype`` (default
    ``config.dtype``), with its weights loaded; in eval mode."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    dtype = dtype or config.dtype
    cls = get_model_class(config.architecture)
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    if load_format == "dummy":
        fill_dummy_weights(model)
    else:
        load_safetensors(model, config.path)
    return model.eval()


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random weights of the real shapes, no file read: N(0, std), RMSNorm weights 1.

    Each checkpoint tensor is drawn whole (unsharded) from a generator seeded by (seed, parameter
    name, shard id), on the parameter's device, and handed to the parameter's ``weight_loader``,
    which keeps this rank's slice as it does for a real checkpoint: every tensor-parallel size
    computes the same model."""
    start = time.perf_counter()
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    params = list(model.named_parameters())
    numel = 0
    bar = tqdm(params, desc="dummy weights", unit="tensor", disable=not sys.stderr.isatty())
    for name, p in bar:
        numel += p.numel()
        if id(p) in norms:
            p.fill_(1.0)
            continue
        loader = getattr(p, "weight_loader", None)
        for shard_id, shape in _checkpoint_shapes(model, name, p).items():
            full = dummy_tensor(name, shard_id, shape, p.dtype, p.device, std, seed)
            if loader is None:
                p.copy_(full)
            else:
                loader(p, full, shard_id)
    logger.info("dummy weights: %.2fB parameters filled at random in %.1f s", numel / 1e9,
                time.perf_counter() - start)


def _checkpoint_shapes(model: nn.Module, name: str, param: nn.Parameter) -> dict[Any, tuple[int, ...]]:
    """Full checkpoint shape(s) of a parameter, by shard id, from the layer that owns it; a
    parameter no parallel layer owns is its own checkpoint tensor."""
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    shapes = getattr(module, "checkpoint_shapes", None)
    return shapes(param) if shapes is not None else {None: tuple(param.shape)}


def dummy_tensor(name: str, shard_id: Any, shape: tuple[int, ...], dtype: torch.dtype,
                 device: Union[str, torch.device], std: float = 0.02, seed: int = 0) -> torch.Tensor:
    """The full dummy checkpoint tensor for (parameter ``name``, ``shard_id``): N(0, std) from a
    generator seeded by those and ``seed`` alone, so every rank draws the same values."""
    digest = hashlib.blake2b(f"{seed}/{name}/{shard_id}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those named by the sharded index, or every *.safetensors."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}/config.json not found: --model-path must be a Hugging Face "
                                f"checkpoint folder")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        absent = [n for n, f in zip(names, files) if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) that are not in the folder: {', '.join(absent)}")
        return files
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; convert the checkpoint to safetensors "
                                f"(save_pretrained(..., safe_serialization=True)) or use --load-format dummy")
    return files


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class LazyTensor:
    """A checkpoint tensor not read yet. ``narrow`` reads just those rows or columns from the
    file, so a tensor-parallel rank reads only its shard; any other torch use reads it whole.
    Weight loaders take it where they take a tensor."""

    def __init__(self, sl: Any, stats: Optional[dict]) -> None:
        self._slice = sl
        self._stats = stats
        self.shape = torch.Size(sl.get_shape())
        self.dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())

    def dim(self) -> int:
        return len(self.shape)

    def _read(self, index: tuple) -> torch.Tensor:
        t = self._slice[index]
        if self._stats is not None:
            self._stats["bytes"] = self._stats.get("bytes", 0) + t.numel() * t.element_size()
        return t

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * self.dim()
        index[dim] = slice(start, start + length)
        return self._read(tuple(index))

    def materialize(self) -> torch.Tensor:
        return self._read(tuple(slice(None) for _ in self.shape))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(x):
            if isinstance(x, LazyTensor):
                return x.materialize()
            if isinstance(x, (list, tuple)):
                return type(x)(real(v) for v in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


def iterate_safetensors(files: list[str], wanted: Callable[[str], bool] = lambda n: True,
                        stats: Optional[dict] = None, lazy: bool = False
                        ) -> Iterator[tuple[str, Union[torch.Tensor, LazyTensor]]]:
    """Yield (name, cpu tensor) for the wanted tensors of ``files``, reading only those, with a
    progress bar over tensors. ``lazy``: yield LazyTensors, read as the model narrows them."""
    from safetensors import safe_open

    names_per_file = []
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as fh:
            names_per_file.append([n for n in fh.keys() if wanted(n)])
    total = sum(len(n) for n in names_per_file)
    bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=not sys.stderr.isatty())
    with bar:
        for f, names in zip(files, names_per_file):
            with safe_open(f, framework="pt", device="cpu") as fh:
                for name in names:
                    if stats is not None:
                        stats["tensors"] = stats.get("tensors", 0) + 1
                    if lazy:
                        yield name, LazyTensor(fh.get_slice(name), stats)
                    else:
                        t = fh.get_tensor(name)
                        if stats is not None:
                            stats["bytes"] = stats.get("bytes", 0) + t.numel() * t.element_size()
                        yield name, t
                    bar.update(1)


def load_safetensors(model: nn.Module, path: str) -> None:
    """Read the checkpoint at ``path`` into ``model`` (via its ``load_weights``), or raise
    WeightLoadError naming what is missing or mis-shaped."""
    files = safetensors_files(path)
    start = time.perf_counter()
    stats: dict = {}
    wanted = getattr(model, "weight_needed", lambda n: True)
    lazy = get_tp_size() > 1    # each rank reads only its slices
    try:
        loaded = model.load_weights(iterate_safetensors(files, wanted, stats, lazy=lazy))
    except ValueError as e:
        raise WeightLoadError(f"{path}: {e}") from None
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise WeightLoadError(f"{path}: {len(missing)} weight(s) of the model are not in the checkpoint, "
                              f"e.g. {', '.join(missing[:5])}; is it the architecture config.json names, "
                              f"and are all shards present?")
    logger.info("loaded %d tensors (%.2f GB read%s) from %d safetensors file(s) in %.1f s",
                stats.get("tensors", 0), stats.get("bytes", 0) / 1e9,
                f", tensor-parallel rank {get_tp_rank()}'s shards" if lazy else "", len(files),
                time.perf_counter() - start)
