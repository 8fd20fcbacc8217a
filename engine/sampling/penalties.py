"""Repetition, frequency and presence penalties as sparse per-step tensors.

Built from the token lists the scheduler already holds, so only the (row, token) pairs that
occur are touched: no [batch, vocab] count tensor is allocated.

Under the overlap scheduler a decode step is launched before the previous step's tokens reach
the host: a request's last token is then not in its host list yet but is this step's input id,
on the device. Such rows are ``pending_rows``; ``apply`` takes the step's input ids and counts
that token in on the device (no sync), with the same arithmetic as if the host had known it, so
the logits equal the plain loop's.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from engine.runner.host_to_device import to_device
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
    # rows (with a penalty) whose last output token is the step's input id, not in output_ids
    pending_rows: Optional[torch.Tensor] = None  # [P] int64
    vocab_size: int = 0

    @classmethod
    def build(cls, params: Sequence[SamplingParams], *, output_ids: Sequence[Sequence[int]],
              prompt_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device,
              pending: Sequence[bool] = ()) -> Optional["PenaltyBatch"]:
        """None when no request in the batch asks for a penalty. ``pending[i]``: request i's last
        output token is in flight (the step's input id) and missing from ``output_ids[i]``."""
        additive = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        repetitive = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if not additive and not repetitive:
            return None

        # copies through pinned memory: under the overlap scheduler the device is still busy
        # with the step before, and a pageable copy would wait for it
        device = torch.device(device)
        rates = to_device([[getattr(p, attr) for p in params]
                           for attr in ("frequency_penalty", "presence_penalty", "repetition_penalty")],
                          device, torch.float32)
        out = cls(frequency=rates[0], presence=rates[1], repetition=rates[2], vocab_size=vocab_size)
        waiting = sorted(i for i in set(additive) | set(repetitive) if i < len(pending) and pending[i])
        if waiting:
            out.pending_rows = to_device(waiting, device)
        if additive:
            rows, cols, counts = _distinct_pairs(additive, [output_ids[i] for i in additive], vocab_size,
                                                 counted=True)
            out.count_rows, out.count_cols = to_device(rows, device), to_device(cols, device)
            out.counts = to_device(counts, device)
        if repetitive:
            seqs = [itertools.chain(prompt_ids[i], output_ids[i]) for i in repetitive]
            rows, cols, _ = _distinct_pairs(repetitive, seqs, vocab_size)
            out.rep_rows, out.rep_cols = to_device(rows, device), to_device(cols, device)
        return out

    def apply(self, logits: torch.Tensor, step_input_ids: Optional[torch.Tensor] = None) -> None:
        """logits: [B, vocab] float32, changed in place. Repetition first (HF: a positive logit is
        divided by the penalty, a negative one multiplied), then frequency and presence
        (OpenAI: logit -= count * frequency + (count > 0) * presence). ``step_input_ids`` [B]:
        the step's input tokens, needed when there are pending rows."""
        rep_rows, rep_cols = self.rep_rows, self.rep_cols
        count_rows, count_cols, counts = self.count_rows, self.count_cols, self.counts
        if self.pending_rows is not None:
            if step_input_ids is None:
                raise ValueError("PenaltyBatch.apply: pending rows need the step's input ids")
            rows = self.pending_rows
            toks = step_input_ids[rows]
            # HF: the token joins the row's set. A pair already there appears twice: both writes
            # store the same transform of the same value, so the cell changes once either way
            rep_rows, rep_cols = _cat(rep_rows, rows), _cat(rep_cols, toks)
            # OpenAI: a known pair's count goes up by one, an unknown one enters with count 1
            # (its presence too); a known pair's new entry adds exactly -0.0
            idx, known = _find(rows, toks, count_rows, count_cols, self.vocab_size)
            if counts is not None and counts.numel():
                counts = counts.index_add(0, idx, known.to(counts.dtype))      # a copy: built once per step
            count_rows, count_cols = _cat(count_rows, rows), _cat(count_cols, toks)
            counts = _cat(counts, (~known).to(torch.float32))
        if rep_rows is not None and rep_rows.numel():
            v = logits[rep_rows, rep_cols]
            r = self.repetition[rep_rows]
            logits[rep_rows, rep_cols] = torch.where(v > 0, v / r, v * r)
        if count_rows is not None and count_rows.numel():
            delta = counts * self.frequency[count_rows] + self.presence[count_rows] * (counts > 0)
            logits.index_put_((count_rows, count_cols), -delta, accumulate=True)


def _cat(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b])


def _find(rows: torch.Tensor, toks: torch.Tensor, known_rows: Optional[torch.Tensor],
          known_cols: Optional[torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (rows[i], toks[i]): (its index among the known pairs, or 0; whether it is one),
    on the device with fixed-size ops (no sync)."""
    if known_rows is None or not known_rows.numel():
        return torch.zeros_like(rows), torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    keys, order = torch.sort(known_rows * vocab_size + known_cols)
    want = rows * vocab_size + toks
    pos = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
    return order[pos], keys[pos] == want


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
