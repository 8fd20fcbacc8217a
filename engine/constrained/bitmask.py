"""Packed token bitmasks (int32 words, bit j of word w = token 32 * w + j) to bool masks."""
from __future__ import annotations

import sys

import numpy as np
import torch

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bitmask: [R, ceil(V / 32)] int32 on the CPU -> [R, vocab_size] bool on ``device``
    (True = allowed). On an accelerator the packed words travel (32x fewer bytes) and are
    unpacked there."""
    if device.type == "cpu" and sys.byteorder == "little":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # [R, 32W] u8
        return torch.from_numpy(bits[:, :vocab_size].view(np.bool_))
    packed = bitmask.to(device, non_blocking=True)
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]   # [R, V]
