"""Repetition, frequency and presence penalties as sparse per-step tensors.

Built from the token lists the scheduler already holds, so only the (row, token) pairs that
occur are touched: no [batch, vocab] count tensor is allocated.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from engine.sampling.sampling_params import SamplingParams


@dataclass
class PenaltyBatch:
    frequency: torch.Tensor                    # [B] float32
    presence: torch.Tensor                     # [B] float32
    repetition: torch.Tensor                   # [B] float32
    # frequency/presence (OpenAI): one entry per distinct (row, generated token)
    count_rows: Optional[torch.Tensor] = None  # [N] int64
    count_cols: Optional[torch.Tensor] = None  # [N] int64
    counts: Optional[torch.Tensor] = None      # [N] float32, occurrences in the output
    # repetition (HF): one entry per distinct (row, token of prompt + output)
    rep_rows: Optional[torch.Tensor] = None    # [M] int64
    rep_cols: Optional[torch.Tensor] = None    # [M] int64

    @classmethod
    def build(cls, params: Sequence[SamplingParams], *, output_ids: Sequence[Sequence[int]],
              prompt_ids: Sequence[Sequence[int]], vocab_size: int,
              device: torch.device) -> Optional["PenaltyBatch"]:
        """None when no request in the batch asks for a penalty."""
        additive = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        repetitive = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if not additive and not repetitive:
            return None

        def per_row(attr: str) -> torch.Tensor:
            return torch.tensor([getattr(p, attr) for p in params], dtype=torch.float32, device=device)

        out = cls(frequency=per_row("frequency_penalty"), presence=per_row("presence_penalty"),
                  repetition=per_row("repetition_penalty"))
        if additive:
            rows, cols, counts = _distinct_pairs(additive, [output_ids[i] for i in additive], vocab_size,
                                                 counted=True)
            out.count_rows, out.count_cols, out.counts = rows.to(device), cols.to(device), counts.to(device)
        if repetitive:
            seqs = [itertools.chain(prompt_ids[i], output_ids[i]) for i in repetitive]
            rows, cols, _ = _distinct_pairs(repetitive, seqs, vocab_size)
            out.rep_rows, out.rep_cols = rows.to(device), cols.to(device)
        return out

    def apply(self, logits: torch.Tensor) -> None:
        """logits: [B, vocab] float32, changed in place. Repetition first (HF: a positive logit is
        divided by the penalty, a negative one multiplied), then frequency and presence
        (OpenAI: logit -= count * frequency + (count > 0) * presence)."""
        if self.rep_rows is not None and self.rep_rows.numel():
            v = logits[self.rep_rows, self.rep_cols]
            r = self.repetition[self.rep_rows]
            logits[self.rep_rows, self.rep_cols] = torch.where(v > 0, v / r, v * r)
        if self.count_rows is not None and self.count_rows.numel():
            delta = self.counts * self.frequency[self.count_rows] + self.presence[self.count_rows]
            logits.index_put_((self.count_rows, self.count_cols), -delta, accumulate=True)


def _distinct_pairs(rows: list[int], seqs: Sequence, vocab_size: int, *, counted: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(row, token) pairs that occur in ``seqs[j]`` for batch row ``rows[j]``, and with ``counted``
    how often (CPU tensors). Deduplicated per request with C-speed set/Counter."""
    per_row = [Counter(seq) for seq in seqs] if counted else [set(seq) for seq in seqs]
    lens = np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row))
    total = int(lens.sum())
    cols = np.fromiter(itertools.chain.from_iterable(per_row), dtype=np.int64, count=total)   # [N]
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), lens)                                # [N]
    ok = (cols >= 0) & (cols < vocab_size)
    counts = None
    if counted:
        values = itertools.chain.from_iterable(c.values() for c in per_row)
        counts = torch.from_numpy(np.fromiter(values, dtype=np.float32, count=total)[ok])
    return torch.from_numpy(row_of[ok]), torch.from_numpy(cols[ok]), counts
