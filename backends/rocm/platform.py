"""The ROCm platform (AMD): a torch build with torch.version.hip; RCCL behind 'nccl'."""
from __future__ import annotations

import torch

from backends.cuda.platform import CudaLikePlatform


class RocmPlatform(CudaLikePlatform):
    name = "hip"
    # MI300 (CDNA3) uses the fnuz fp8 variants.
    fp8_dtype = getattr(torch, "float8_e4m3fnuz", None)
    attention_preference = ("aiter", "triton", "torch")

    @classmethod
    def is_available(cls) -> bool:
        return getattr(torch.version, "hip", None) is not None and torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if getattr(torch.version, "hip", None) is None:
            return "--device hip: this torch build has no ROCm support"
        return "--device hip: torch has ROCm support but sees no AMD GPU"
