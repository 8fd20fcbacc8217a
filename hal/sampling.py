"""The sampling role: from logits and per-request parameters to next token ids.

The batch's parameters travel in ``engine.sampling.sampling_batch_info.SamplingBatchInfo``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from engine.sampling.sampling_batch_info import SamplingBatchInfo


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor                        # [B] int64
    logprobs: Optional[torch.Tensor] = None             # [B] float32, log p(chosen) under the raw model
    top_logprobs: Optional[torch.Tensor] = None         # [B, k] float32, descending
    top_logprob_ids: Optional[torch.Tensor] = None      # [B, k] int64


class Sampler(ABC):
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device

    @abstractmethod
    def sample(self, logits: torch.Tensor, info: "SamplingBatchInfo") -> SampleOutput:
        """logits: [B, vocab] (any float dtype). Applies masks, penalties, temperature,
        top-k/top-p/min-p and per-request seeds, then draws one token per row."""
