"""The CPU platform: always present; gloo collectives; memory from the OS."""
from __future__ import annotations

import os

import torch

from hal.platform import Platform


def _meminfo_bytes(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class CpuPlatform(Platform):
    name = "cpu"
    torch_device_type = "cpu"
    dist_backend = "gloo"
    supports_graphs = False
    uses_host_memory = True
    async_execution = False   # torch ops return when done: nothing to overlap with
    attention_preference = ("torch",)
    sampling_preference = ("torch",)
    default_dtype = torch.float32

    @classmethod
    def is_available(cls) -> bool:
        return True

    def description(self) -> str:
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

    def memory_info(self) -> tuple[int, int]:
        total = _meminfo_bytes("MemTotal")
        free = _meminfo_bytes("MemAvailable") or total
        return free, total
