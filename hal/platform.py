"""The Platform: what the engine may ask of a device, with no vendor branching left to callers.

Vendor folders under ``backends/`` subclass ``Platform`` and register it with
``register_platform``; ``get_platform`` picks one from ``--device``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from hal.kernel_config import KernelConfig, overrides as kernel_config_overrides

logger = logging.getLogger(__name__)

# --device auto tries these in order.
AUTO_ORDER = ("cuda", "hip", "xpu", "cpu")


class DeviceUnavailableError(RuntimeError):
    """--device names a device this machine or this torch build cannot provide."""


class Platform:
    """One kind of device. Subclasses fill in the vendor facts."""

    name: str = "base"                # the --device name: cuda, hip, xpu, cpu
    torch_device_type: str = "cpu"    # what torch calls it (ROCm PyTorch also says "cuda")
    dist_backend: str = "gloo"        # torch.distributed backend
    supports_graphs: bool = False     # step capture and replay (CUDA/HIP graphs)
    uses_host_memory: bool = False    # device memory is the machine's RAM (size the KV cache modestly)
    # Kernels run asynchronously to the host, so the scheduler gains from preparing the next step
    # while one runs (the overlap scheduler is on by default where this holds).
    async_execution: bool = True
    attention_preference: tuple[str, ...] = ("torch",)
    sampling_preference: tuple[str, ...] = ("torch",)
    layer_ops_preference: tuple[str, ...] = ("torch",)   # RMSNorm, SiLU-and-mul, rotary
    default_dtype: torch.dtype = torch.float32
    fp8_dtype: Optional[torch.dtype] = None            # the e4m3 variant its fp8 kernels use
    fp8_e5m2_dtype: torch.dtype = torch.float8_e5m2
    default_kernel_config: KernelConfig = KernelConfig()  # Triton launch parameters (vendor values)

    # -- presence --------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"--device {cls.name}: not available on this machine"

    # -- identity --------------------------------------------------------------------------
    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        pass

    def device(self, index: int = 0) -> torch.device:
        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, index)

    def description(self) -> str:
        return self.name

    # -- numbers ---------------------------------------------------------------------------
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def kv_cache_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        """--kv-cache-dtype as the KV pool's torch dtype: 'auto' keeps the model's; fp8_e4m3 and
        fp8_e5m2 take this device's variant of the format (the fnuz ones on MI300). A format the
        device's kernels cannot convert is a ValueError that says what to pass instead."""
        if name == "auto":
            return model_dtype
        if name in ("fp8", "fp8_e4m3"):    # fp8: vLLM's name for e4m3
            return self.fp8_dtype or torch.float8_e4m3fn
        if name == "fp8_e5m2":
            return self.fp8_e5m2_dtype
        raise ValueError(f"--kv-cache-dtype {name}: unknown; choose auto, fp8 (= fp8_e4m3), fp8_e4m3 or "
                         "fp8_e5m2")

    def memory_info(self) -> tuple[int, int]:
        """(free_bytes, total_bytes) of the device's memory."""
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def copy_to_host_async(self, tensors: list[Optional[torch.Tensor]]) -> "HostCopy":
        """Start copying device tensors to the host without waiting for the device; ``wait()``
        returns the host tensors once the work queued so far (and the copy) is done."""
        if self.torch_device_type == "cpu":
            return HostCopy(tensors, None)
        host = []
        for t in tensors:
            if t is None:
                host.append(None)
                continue
            h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            host.append(h.copy_(t, non_blocking=True))
        event = torch.Event(device=self.torch_device_type)
        event.record()
        return HostCopy(host, event)

    def empty_cache(self) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- kernels ---------------------------------------------------------------------------
    def compute_units(self) -> int:
        """Parallel units of the device (SMs, CUs, Xe cores): how many programs run at once."""
        return 1

    def device_kernel_config(self) -> KernelConfig:
        """The vendor's launch parameters with what this device reports (vendors override this,
        not kernel_config, so that the overrides always apply)."""
        return self.default_kernel_config.with_compute_units(self.compute_units())

    def supports_dependent_launch(self) -> bool:
        """Whether kernels may be launched to overlap the one before them (KernelConfig.pdl)."""
        return False

    def kernel_config(self) -> KernelConfig:
        """The launch parameters of the portable Triton kernels on this device, with the process's
        --kernel-config overrides (pdl only where the device supports it)."""
        cfg = self.device_kernel_config().with_overrides(kernel_config_overrides())
        if cfg.pdl and not self.supports_dependent_launch():
            cfg = dataclasses.replace(cfg, pdl=0)
        return cfg


class HostCopy:
    """Host copies of some device tensors, readable after ``wait()``."""

    def __init__(self, tensors: list[Optional[torch.Tensor]], event: Optional["torch.Event"]) -> None:
        self._tensors = tensors
        self._event = event

    def wait(self) -> list[Optional[torch.Tensor]]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors


_PLATFORMS: dict[str, type[Platform]] = {}


def register_platform(cls: type[Platform]) -> type[Platform]:
    _PLATFORMS[cls.name] = cls
    return cls


def registered_platforms() -> dict[str, type[Platform]]:
    from hal.plugins import load_backends

    load_backends()
    return dict(_PLATFORMS)


def platform_for_device(device: torch.device) -> Platform:
    """The available platform whose tensors live on ``device`` (first in --device auto order)."""
    platforms = registered_platforms()
    for name in AUTO_ORDER + tuple(sorted(set(platforms) - set(AUTO_ORDER))):
        cls = platforms.get(name)
        if cls is not None and cls.torch_device_type == device.type and cls.is_available():
            return cls()
    raise DeviceUnavailableError(f"no available platform holds tensors on device {device}")


def get_platform(device: str = "auto") -> Platform:
    """Resolve --device to a Platform instance, or raise DeviceUnavailableError saying why."""
    platforms = registered_platforms()
    if device == "auto":
        for name in AUTO_ORDER:
            cls = platforms.get(name)
            if cls is not None and cls.is_available():
                return cls()
        raise DeviceUnavailableError("--device auto: no platform is available (not even cpu)")
    cls = platforms.get(device)
    if cls is None:
        raise DeviceUnavailableError(
            f"--device {device}: unknown device; known: {', '.join(sorted(platforms))}")
    if not cls.is_available():
        raise DeviceUnavailableError(cls.unavailable_reason())
    return cls()
