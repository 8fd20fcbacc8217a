"""KernelConfig: launch parameters of the portable Triton kernels on one kind of device.

Each Platform carries one (``Platform.kernel_config()``); vendor folders set their values, the
kernels in ``backends/triton`` read them and never ask which vendor they run on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    warp_size: int = 32                    # threads per warp (wavefront); informational for num_warps
    shared_memory_bytes: int = 48 * 1024   # per block; tiles are shrunk until they fit
    num_compute_units: int = 1             # SMs / CUs / Xe cores; filled in at run time
    # decode: one program per (request, KV head, KV split)
    decode_block_n: int = 64               # KV positions per inner iteration
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    max_kv_splits: int = 16                # a power of two; splits along the sequence
    min_split_tokens: int = 256            # a split never holds fewer KV positions than this
    # extend: one program per (request, q head, block of new tokens)
    extend_block_m: int = 64
    extend_block_n: int = 64
    extend_num_warps: int = 4
    extend_num_stages: int = 2
    # element-wise kernels (norm, activation, rotary, KV store)
    elementwise_num_warps: int = 4

    def __post_init__(self) -> None:
        if self.max_kv_splits < 1 or self.max_kv_splits & (self.max_kv_splits - 1):
            raise ValueError(f"max_kv_splits must be a power of two, got {self.max_kv_splits}")
        for name in ("decode_block_n", "extend_block_m", "extend_block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")

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
        """(block_n, num_stages) for decode attention at ``head_dim``."""
        d = _pow2_at_least(head_dim)
        n, stages = self.decode_block_n, self.decode_num_stages
        while 2 * n * d * max(stages, 1) * elem_bytes > self.shared_memory_bytes and stages > 1:
            stages -= 1
        while 2 * n * d * max(stages, 1) * elem_bytes > self.shared_memory_bytes and n > 16:
            n //= 2
        return n, stages

    def with_compute_units(self, n: int) -> "KernelConfig":
        return dataclasses.replace(self, num_compute_units=max(1, int(n)))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
