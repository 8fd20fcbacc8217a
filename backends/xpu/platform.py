"""The XPU platform (Intel GPUs): torch.xpu; xccl collectives."""
from __future__ import annotations

import torch

from hal.kernel_config import KernelConfig
from hal.platform import Platform

# Intel Xe (Max 1550 / Arc): conservative defaults, 64 KiB of shared local memory per work-group.
XPU_KERNEL_CONFIG = KernelConfig(
    warp_size=32, shared_memory_bytes=64 * 1024,
    decode_block_n=64, decode_num_warps=4, decode_num_stages=2, max_kv_splits=16, min_split_tokens=256,
    extend_block_m=64, extend_block_n=64, extend_num_warps=4, extend_num_stages=2,
    elementwise_num_warps=4)


def _xpu():
    return getattr(torch, "xpu", None)


class XpuPlatform(Platform):
    name = "xpu"
    torch_device_type = "xpu"
    dist_backend = "xccl"
    supports_graphs = False
    attention_preference = ("triton", "torch")
    sampling_preference = ("torch",)
    layer_ops_preference = ("triton", "torch")
    default_dtype = torch.bfloat16
    default_kernel_config = XPU_KERNEL_CONFIG

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

    def compute_units(self) -> int:
        props = _xpu().get_device_properties(_xpu().current_device())
        return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 0) or 64)
