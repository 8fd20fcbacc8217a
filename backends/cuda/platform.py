"""The CUDA platform (NVIDIA): detected when torch has CUDA and is not a ROCm build."""
from __future__ import annotations

import dataclasses

import torch

from hal.kernel_config import KernelConfig
from hal.platform import Platform

# Hopper/Ampere-class defaults; shared memory and SM count are read from the device at run time.
# min_split_tokens 64: short contexts at small batches split 4x finer than at 256 and decode
# attention takes 6.3 instead of 10.1 us per layer at batch 1 x 512 on the H200; batches that
# fill the device use one split anyway (benchmarks/sweep_decode_attention.py, RESULTS.md).
# balance_splits stays 1: 4 splits were 17-21% faster per attention call at batch 32-128 with
# ShareGPT-like uneven contexts, but three same-run A/Bs of the whole 1000-prompt run were within
# run-to-run noise (decode 14.92 -> 14.59 s; 14.46 -> 14.57 and 14.56 s; H200, RESULTS.md).
# gemv_max_rows 16: at batch 1 the one-row GEMV streams Llama-3.1-8B's four projections in 112.5
# against cuBLAS's 126.4 us per layer (down with SiLU-and-mul fused in; H200, benchmarks/sweep_gemv.py)
# and batch-1 decode went 209.4 -> 229.0 tok/s in the same run. At 2-16 rows the tile GEMV is 1.05x
# cuBLAS per layer (o 1.15x, no split-K reduce) and decode at batch 2/4/8/16 gains 2.4-3.2%; at 32
# rows it is slower than cuBLAS (sweep_gemv.py --kernel tile, bench_decode.py --batch-size).
# skinny_max_rows 48: the one-pass GEMM (skinny_gemm.py) lifts decode at batch 24/32/48 by 1.2/1.7/0.6%
# over cuBLAS (two engines against one, same call); at 64/96/128 rows it loses 1.3/5.9/6.7% (o is
# slower than cuBLAS at every size; H100, bench_decode.py and sweep_skinny_gemm.py, RESULTS.md).
CUDA_KERNEL_CONFIG = KernelConfig(
    warp_size=32, shared_memory_bytes=99 * 1024,
    decode_block_n=64, decode_num_warps=4, decode_num_stages=2, max_kv_splits=16, min_split_tokens=64,
    extend_block_m=128, extend_block_n=64, extend_num_warps=8, extend_num_stages=2,
    elementwise_num_warps=4,
    gemv_max_rows=16, gemv_block_n=8, gemv_block_k=512, gemv_num_warps=4, gemv_num_stages=3,
    gemv_tile_n=32, gemv_tile_k=256, gemv_tile_num_warps=4, gemv_tile_num_stages=5,
    skinny_max_rows=48, skinny_block_n=64, skinny_block_k=128, skinny_k_per_split=8192, skinny_num_warps=4,
    skinny_num_stages=4)


class CudaLikePlatform(Platform):
    """What CUDA and ROCm builds of torch share: the torch.cuda API and stream graphs."""

    torch_device_type = "cuda"
    dist_backend = "nccl"
    supports_graphs = True
    attention_preference = ("triton", "torch")
    sampling_preference = ("torch",)
    layer_ops_preference = ("triton", "torch")
    default_dtype = torch.bfloat16
    default_kernel_config = CUDA_KERNEL_CONFIG

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def description(self) -> str:
        return f"{self.name} ({torch.cuda.get_device_name()}, {self.device_count()} visible)"

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.cuda.is_bf16_supported():
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def compute_units(self) -> int:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def device_kernel_config(self) -> KernelConfig:
        """The vendor defaults with this device's SM/CU count and shared memory per block."""
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cfg = self.default_kernel_config.with_compute_units(props.multi_processor_count)
        smem = getattr(props, "shared_memory_per_block_optin", 0)
        return dataclasses.replace(cfg, shared_memory_bytes=smem) if smem else cfg


class CudaPlatform(CudaLikePlatform):
    name = "cuda"
    fp8_dtype = torch.float8_e4m3fn
    # Triton first: FlashInfer (captured too) reaches 0.89-0.93x of it on the H200 (RESULTS.md)
    attention_preference = ("triton", "flashinfer", "torch")
    sampling_preference = ("torch",)

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    def supports_dependent_launch(self) -> bool:
        """Programmatic dependent launch: Hopper (sm90) and later."""
        return torch.cuda.get_device_capability(torch.cuda.current_device())[0] >= 9

    def kv_cache_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        """Triton converts to and from e4m3 only on sm89 (Ada) and later; e5m2 everywhere."""
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        if name in ("fp8", "fp8_e4m3") and (major, minor) < (8, 9):
            raise ValueError(f"--kv-cache-dtype {name} (e4m3) needs compute capability 8.9 or later "
                             f"(Ada, Hopper); this GPU is sm_{major}{minor}: pass fp8_e5m2")
        return super().kv_cache_dtype(name, model_dtype)

    @classmethod
    def unavailable_reason(cls) -> str:
        if torch.version.cuda is None:
            return "--device cuda: this torch build has no CUDA support"
        return "--device cuda: torch has CUDA support but sees no NVIDIA GPU"
