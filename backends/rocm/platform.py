"""The ROCm platform (AMD): a torch build with torch.version.hip; RCCL behind 'nccl'."""
from __future__ import annotations

import torch

from backends.cuda.platform import CudaLikePlatform
from hal.kernel_config import KernelConfig

# CDNA3 (MI300): 64-wide wavefronts, 64 KiB of LDS per CU, and single-stage loops (the AMD Triton
# backend's stream pipelining gains little here and costs LDS).
CDNA3_KERNEL_CONFIG = KernelConfig(
    warp_size=64, shared_memory_bytes=64 * 1024,
    decode_block_n=64, decode_num_warps=4, decode_num_stages=1, max_kv_splits=16, min_split_tokens=256,
    extend_block_m=128, extend_block_n=64, extend_num_warps=4, extend_num_stages=1,
    elementwise_num_warps=4)


class RocmPlatform(CudaLikePlatform):
    name = "hip"
    # MI300 (CDNA3) uses the fnuz fp8 variants.
    fp8_dtype = getattr(torch, "float8_e4m3fnuz", None)
    fp8_e5m2_dtype = getattr(torch, "float8_e5m2fnuz", torch.float8_e5m2)
    attention_preference = ("aiter", "triton", "torch")
    layer_ops_preference = ("aiter", "triton", "torch")   # "aiter" is registered only where it is installed
    default_kernel_config = CDNA3_KERNEL_CONFIG

    @classmethod
    def is_available(cls) -> bool:
        return getattr(torch.version, "hip", None) is not None and torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if getattr(torch.version, "hip", None) is None:
            return "--device hip: this torch build has no ROCm support"
        return "--device hip: torch has ROCm support but sees no AMD GPU"
