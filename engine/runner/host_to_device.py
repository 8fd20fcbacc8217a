"""Host data onto the device without waiting for the device.

A plain copy of pageable host memory may block until the work queued before it has finished; the
overlap scheduler builds step N+1 while step N runs, so its copies go through pinned memory.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch


def to_device(data: Union[torch.Tensor, Sequence], device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``data`` (a host tensor, or a list of numbers as ``dtype``) on ``device``, copied asynchronously."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cpu" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned() and t.numel():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
