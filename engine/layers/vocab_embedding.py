"""Token embedding and LM head, split over tensor-parallel ranks along the vocabulary.

Each rank holds ``ceil(vocab / tp_size)`` rows; rows past the real vocabulary are zero padding
(trimmed from the logits by the LogitsProcessor).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.parallel_state import get_tp_collectives, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: Optional[int] = None,
                 tp_size: Optional[int] = None) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = get_tp_size() if tp_size is None else tp_size
        self.collectives = get_tp_collectives()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        # [rows_per_rank, hidden_size]
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"vocab embedding: checkpoint tensor has shape {tuple(loaded.shape)} but the "
                             f"model expects {(self.vocab_size, param.shape[1])}; does config.json's "
                             f"vocab_size/hidden_size match the weights?")
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        param.data[rows:].zero_()
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def checkpoint_shapes(self, param: nn.Parameter) -> dict[None, tuple[int, int]]:
        """The full [vocab_size, hidden_size] table of which ``weight_loader`` keeps this rank's rows."""
        return {None: (self.vocab_size, param.shape[1])}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [num_tokens] -> [num_tokens, hidden_size]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.collectives.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab; its matmul is done by the LogitsProcessor."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")
