"""KernelConfig: launch parameters of the portable Triton kernels on one kind of device.

Each Platform carries one (``Platform.kernel_config()``); vendor folders set their values, the
kernels in ``backends/triton`` read them and never ask which vendor they run on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class KernelConfig:
    warp_size: int = 32                    # threads per warp (wavefront); informational for num_warps
    shared_memory_bytes: int = 48 * 1024   # per block; tiles are shrunk until they fit
    num_compute_units: int = 1             # SMs / CUs / Xe cores; filled in at run time
    # decode: one program per (request, KV head, KV split)
    decode_block_n: int = 64               # KV positions per inner iteration (2-byte pool; an fp8
                                           # pool takes twice as many: the same bytes)
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    max_kv_splits: int = 16                # a power of two; splits along the sequence
    min_split_tokens: int = 256            # a split never holds fewer KV positions than this
    # While the decode grid has at most balance_programs_per_unit programs per compute unit, split
    # each request at least balance_splits ways (long ones: short ones stop at min_split_tokens),
    # so that a few long contexts do not leave units idle. 1: no minimum (4 was faster per call
    # but not end to end: backends/cuda/platform.py, benchmarks/RESULTS.md).
    balance_programs_per_unit: int = 8
    balance_splits: int = 1
    # 1: a decode step's attention kernel rotates q and the new k itself and writes the new k and v
    # to the pool: no rotary or KV-store kernel (+2% at batch 1 on the H200, benchmarks/RESULTS.md)
    decode_fused_rotary: int = 1
    # extend: one program per (request, q head, block of new tokens)
    extend_block_m: int = 64
    extend_block_n: int = 64
    extend_num_warps: int = 4
    extend_num_stages: int = 2
    # element-wise kernels (norm, activation, rotary, KV store)
    elementwise_num_warps: int = 4
    # linears of at most gemv_max_rows rows (small decode batches) as a GEMV of our own
    # (backends/triton/gemv.py) instead of the vendor BLAS; 0: never. For one row each program
    # streams gemv_block_n rows of the weight along K in gemv_block_k chunks; for more, each
    # streams gemv_tile_n rows of it in gemv_tile_k chunks and multiplies them by all the rows of
    # x (16 or 32 per program) on the tensor cores.
    gemv_max_rows: int = 0
    gemv_block_n: int = 8
    gemv_block_k: int = 512
    gemv_num_warps: int = 4
    gemv_num_stages: int = 3
    gemv_tile_n: int = 32
    gemv_tile_k: int = 256
    gemv_tile_num_warps: int = 4
    gemv_tile_num_stages: int = 4
    # linears of more than gemv_max_rows and at most skinny_max_rows rows (mid-sized decode
    # batches) as the one-pass GEMM of backends/triton/skinny_gemm.py; 0: never. Each program
    # streams skinny_block_n rows of the weight in skinny_block_k chunks along at most
    # skinny_k_per_split of K (split-K with a second, summing kernel past that). At most
    # skinny_gemm.MAX_ROWS (128) take it, whatever this says.
    skinny_max_rows: int = 0
    skinny_block_n: int = 64
    skinny_block_k: int = 128
    skinny_k_per_split: int = 8192
    skinny_num_warps: int = 4
    skinny_num_stages: int = 4
    # the fused mixture-of-experts MLP (backends/triton/fused_moe.py): each program multiplies a
    # block of one expert's routed rows (16 up to moe_block_m, by the mean rows per expert) by
    # moe_block_n rows of that expert's weight, in moe_block_k chunks along K
    moe_block_m: int = 64
    moe_block_n: int = 64
    moe_block_k: int = 64
    moe_num_warps: int = 4
    moe_num_stages: int = 3
    # 1: the one-row GEMV also does the RMSNorm of its input where the model asks (rms_norm_linear:
    # a decoder layer's two norms), in the same pass over x (H200 batch 1: 237.4 -> 238.3 tok/s)
    gemv_fuse_norm: int = 1
    # 1: launch the Triton kernels of a decode step (all but extend attention) with programmatic
    # dependent launch (NVIDIA sm90+): each may start while the one before it finishes, and the
    # GEMV reads its first weights then. Platform.kernel_config() turns it off where the device
    # cannot (supports_dependent_launch). Not faster on the H200, so off (benchmarks/RESULTS.md).
    pdl: int = 0

    def __post_init__(self) -> None:
        if self.max_kv_splits < 1 or self.max_kv_splits & (self.max_kv_splits - 1):
            raise ValueError(f"max_kv_splits must be a power of two, got {self.max_kv_splits}")
        for name in ("decode_block_n", "extend_block_m", "extend_block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        for name in ("gemv_block_n", "gemv_block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        for name in ("gemv_tile_n", "gemv_tile_k", "skinny_block_n", "skinny_block_k", "moe_block_m", "moe_block_n",
                     "moe_block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.gemv_max_rows < 0:
            raise ValueError(f"gemv_max_rows must be >= 0, got {self.gemv_max_rows}")
        if self.skinny_max_rows < 0:
            raise ValueError(f"skinny_max_rows must be >= 0, got {self.skinny_max_rows}")

    def extend_tiles(self, head_dim: int, elem_bytes: int) -> tuple[int, int, int]:
        """(block_m, block_n, num_stages) for extend attention at ``head_dim``, shrunk until the Q
        tile plus ``num_stages`` K and V tiles fit in shared memory."""
        d = _pow2_at_least(head_dim)
        m, n, stages = self.extend_block_m, self.extend_block_n, self.extend_num_stages

        def smem() -> int:
            return (m * d + 2 * n * d * max(stages, 1)) * elem_bytes

        while smem() > self.shared_memory_bytes and stages > 1:
            stages -= 1
        while smem() > self.shared_memory_bytes and (m > 16 or n > 16):
            if m >= n and m > 16:
                m //= 2
            else:
                n //= 2
        return m, n, stages

    def decode_tiles(self, head_dim: int, elem_bytes: int) -> tuple[int, int]:
        """(block_n, num_stages) for decode attention at ``head_dim`` over a pool of ``elem_bytes``
        an element: a 1-byte (fp8) pool reads twice decode_block_n positions an iteration."""
        d = _pow2_at_least(head_dim)
        n, stages = self.decode_block_n * (2 if elem_bytes == 1 else 1), self.decode_num_stages
        while 2 * n * d * max(stages, 1) * elem_bytes > self.shared_memory_bytes and stages > 1:
            stages -= 1
        while 2 * n * d * max(stages, 1) * elem_bytes > self.shared_memory_bytes and n > 16:
            n //= 2
        return n, stages

    def with_compute_units(self, n: int) -> "KernelConfig":
        return dataclasses.replace(self, num_compute_units=max(1, int(n)))

    def with_overrides(self, overrides: Mapping[str, int]) -> "KernelConfig":
        check_overrides(overrides)
        return dataclasses.replace(self, **overrides) if overrides else self


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Field names and integer values, or a ValueError that lists the fields."""
    names = [f.name for f in dataclasses.fields(KernelConfig) if f.name != "num_compute_units"]
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown kernel config field {key!r}; the fields are: {', '.join(names)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"kernel config field {key} must be an integer, got {value!r}")


# Overrides of every platform's KernelConfig in this process (--kernel-config): set once by the
# model runner before it builds the backends, read by Platform.kernel_config().
_overrides: dict[str, int] = {}


def set_overrides(overrides: Mapping[str, int]) -> None:
    KernelConfig().with_overrides(overrides)    # names, integers and the dataclass's rules, now
    _overrides.clear()
    _overrides.update(overrides)


def overrides() -> Mapping[str, int]:
    return dict(_overrides)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
