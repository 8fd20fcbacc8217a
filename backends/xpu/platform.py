"""The XPU platform (Intel GPUs): torch.xpu; xccl collectives."""
from __future__ import annotations

import torch

from hal.platform import Platform


def _xpu():
    return getattr(torch, "xpu", None)


class XpuPlatform(Platform):
    name = "xpu"
    torch_device_type = "xpu"
    dist_backend = "xccl"
    supports_graphs = False
    attention_preference = ("triton", "torch")
    sampling_preference = ("torch",)
    default_dtype = torch.bfloat16

    @classmethod
    def is_available(cls) -> bool:
        x = _xpu()
        return x is not None and x.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if _xpu() is None:
            return "--device xpu: this torch build has no XPU support"
        return "--device xpu: torch has XPU support but sees no Intel GPU"

    def device_count(self) -> int:
        return _xpu().device_count()

    def set_device(self, index: int) -> None:
        _xpu().set_device(index)

    def memory_info(self) -> tuple[int, int]:
        x = _xpu()
        total = x.get_device_properties(0).total_memory
        return total - x.memory_reserved(), total

    def synchronize(self) -> None:
        _xpu().synchronize()

    def empty_cache(self) -> None:
        _xpu().empty_cache()
