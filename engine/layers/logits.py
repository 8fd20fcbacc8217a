"""LogitsProcessor: final hidden states of the rows that need a next token -> fp32 logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.vocab_embedding import VocabParallelEmbedding


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor, lm_head: VocabParallelEmbedding, forward_batch) -> torch.Tensor:
        """hidden: [num_tokens, hidden_size] -> logits [num_logits, vocab_size] fp32, for the rows
        ``forward_batch.logits_indices`` (all rows when it is None)."""
        idx = forward_batch.logits_indices
        if idx is not None:
            hidden = hidden.index_select(0, idx)
        logits = F.linear(hidden, lm_head.weight)  # [num_logits, rows_per_rank]
        if lm_head.tp_size > 1:
            logits = lm_head.collectives.all_gather(logits, dim=-1)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        out = forward_batch.logits_out
        if out is not None:
            out = out[: logits.shape[0]]
            out.copy_(logits)     # the same one conversion to fp32 as .float(), into place
            return out
        return logits.float()
