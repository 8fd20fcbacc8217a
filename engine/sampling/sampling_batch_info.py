"""SamplingBatchInfo: one step's sampling parameters as device tensors, built once per step.

Also owns the logit adjustments every sampler applies before drawing (logit_bias, banned ids,
the grammar mask, penalties), so that all sampling backends agree on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from engine.runner.host_to_device import to_device
from engine.sampling.penalties import PenaltyBatch
from engine.sampling.sampling_params import SamplingParams

_INT64_SPAN = 1 << 64


@dataclass
class SamplingBatchInfo:
    vocab_size: int
    temperatures: torch.Tensor         # [B] float32 (1.0 on greedy rows, never used there)
    top_ks: torch.Tensor               # [B] int64, vocab_size where top-k is off
    top_ps: torch.Tensor               # [B] float32, 1.0 where top-p is off
    min_ps: torch.Tensor               # [B] float32, 0.0 where min-p is off
    seeds: torch.Tensor                # [B] int64 (a 64-bit seed, stored two's complement)
    steps: torch.Tensor                # [B] int64 tokens generated so far = position being sampled
    greedy_rows: torch.Tensor          # [Bg] int64 rows drawn by argmax
    sample_rows: torch.Tensor          # [Bs] int64 rows drawn at random
    # Flags computed on the host so samplers can skip work without a device sync.
    is_all_greedy: bool
    is_all_sampled: bool
    need_top_k: bool                   # over sampled rows only
    need_top_p: bool
    need_min_p: bool
    max_top_k: int                     # largest top-k among sampled rows (vocab_size where off)
    need_logprobs: bool
    max_top_logprobs: int              # k of the top alternatives to return (0: none)
    return_logprob: list[bool]
    top_logprobs_nums: list[int]
    # Sparse logit adjustments, each None when no request needs it.
    bias_rows: Optional[torch.Tensor] = None     # [N] int64
    bias_cols: Optional[torch.Tensor] = None     # [N] int64
    bias_vals: Optional[torch.Tensor] = None     # [N] float32
    banned_rows: Optional[torch.Tensor] = None   # [M] int64
    banned_cols: Optional[torch.Tensor] = None   # [M] int64
    penalties: Optional[PenaltyBatch] = None
    # Grammar-constrained decoding fills this: [B, V'] bool, True = allowed. V' may be the
    # tokenizer's vocabulary, smaller than the padded model vocabulary; ids >= V' are disallowed.
    vocab_mask: Optional[torch.Tensor] = None
    # When only some rows are constrained: [R] int64, the rows vocab_mask ([R, V']) belongs to;
    # the other rows are left alone (a request's tokens never depend on its batch).
    vocab_mask_rows: Optional[torch.Tensor] = None
    # [B] int64, the step's input ids on the device (a decode step under the overlap scheduler):
    # the penalties' pending rows take their last token from here
    step_input_ids: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.temperatures.shape[0])

    @property
    def need_penalties(self) -> bool:
        return self.penalties is not None

    @property
    def modifies_logits(self) -> bool:
        return (self.bias_rows is not None or self.banned_rows is not None
                or self.vocab_mask is not None or self.penalties is not None)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], *, seeds: Sequence[int], steps: Sequence[int],
              output_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]],
              banned_token_ids: Sequence[Sequence[int]], top_logprobs_nums: Sequence[int],
              return_logprob: Sequence[bool], vocab_size: int,
              device: Union[str, torch.device], pending: Sequence[bool] = ()) -> "SamplingBatchInfo":
        """``pending[i]``: request i's last output token is not in ``output_ids[i]`` yet but is the
        step's input id (set ``step_input_ids`` before the logit adjustments)."""
        batch = len(params)
        for name, seq in (("seeds", seeds), ("steps", steps), ("output_ids", output_ids),
                          ("prompt_ids", prompt_ids), ("banned_token_ids", banned_token_ids),
                          ("top_logprobs_nums", top_logprobs_nums), ("return_logprob", return_logprob)):
            if len(seq) != batch:
                raise ValueError(f"SamplingBatchInfo.build: {name} has {len(seq)} entries, "
                                 f"expected one per request ({batch})")
        device = torch.device(device)
        greedy = [p.is_greedy for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        top_ks = [vocab_size if p.top_k < 1 else min(p.top_k, vocab_size) for p in params]

        # the per-request rows travel in two copies (one float32, one int64), not eight
        floats = to_device(torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                         [p.top_p for p in params], [p.min_p for p in params]],
                                        dtype=torch.float32).view(3, batch), device)
        order = [i for i, g in enumerate(greedy) if g] + [i for i, g in enumerate(greedy) if not g]
        ints = to_device(torch.tensor([top_ks, [_as_int64(s) for s in seeds], list(steps), order],
                                      dtype=torch.int64).view(4, batch), device)
        num_greedy = batch - len(sampled)
        wanted = [k if r else 0 for k, r in zip(top_logprobs_nums, return_logprob)]
        info = cls(
            vocab_size=vocab_size,
            temperatures=floats[0],
            top_ks=ints[0],
            top_ps=floats[1],
            min_ps=floats[2],
            seeds=ints[1],
            steps=ints[2],
            greedy_rows=ints[3, :num_greedy],
            sample_rows=ints[3, num_greedy:],
            is_all_greedy=not sampled,
            is_all_sampled=len(sampled) == batch,
            need_top_k=any(k < vocab_size for k, g in zip(top_ks, greedy) if not g),
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
            max_top_k=max((k for k, g in zip(top_ks, greedy) if not g), default=0),
            need_logprobs=any(return_logprob),
            max_top_logprobs=max(wanted, default=0),
            return_logprob=list(return_logprob),
            top_logprobs_nums=list(top_logprobs_nums),
        )
        info._build_sparse(params, banned_token_ids, device)
        info.penalties = PenaltyBatch.build(params, output_ids=output_ids, prompt_ids=prompt_ids,
                                            vocab_size=vocab_size, device=device, pending=pending)
        return info

    def _build_sparse(self, params: Sequence[SamplingParams], banned_token_ids: Sequence[Sequence[int]],
                      device: torch.device) -> None:
        vocab = self.vocab_size
        bias = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()
                if 0 <= t < vocab]
        if bias:
            rows, cols, vals = zip(*bias)
            self.bias_rows = _to_device(rows, torch.int64, device)
            self.bias_cols = _to_device(cols, torch.int64, device)
            self.bias_vals = _to_device(vals, torch.float32, device)
        banned = [(i, t) for i, ids in enumerate(banned_token_ids) for t in ids if 0 <= t < vocab]
        if banned:
            rows, cols = zip(*banned)
            self.banned_rows = _to_device(rows, torch.int64, device)
            self.banned_cols = _to_device(cols, torch.int64, device)

    def apply_logit_adjustments(self, logits: torch.Tensor) -> None:
        """logits: [B, vocab] float32, changed in place, in this order: logit_bias, banned ids,
        grammar mask, penalties."""
        if self.bias_rows is not None:
            logits.index_put_((self.bias_rows, self.bias_cols), self.bias_vals, accumulate=True)
        if self.banned_rows is not None:
            logits[self.banned_rows, self.banned_cols] = float("-inf")
        if self.vocab_mask is not None:
            rows = self.vocab_mask_rows
            sub = logits if rows is None else logits.index_select(0, rows)    # [R, vocab]
            allowed = self.vocab_mask.shape[1]
            sub[:, :allowed].masked_fill_(~self.vocab_mask, float("-inf"))
            if allowed < sub.shape[1]:
                sub[:, allowed:] = float("-inf")
            if rows is not None:
                logits.index_copy_(0, rows, sub)
        if self.penalties is not None:
            self.penalties.apply(logits, self.step_input_ids)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(values, device, dtype)


def _as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same low 64 bits."""
    seed = int(seed) % _INT64_SPAN
    return seed - _INT64_SPAN if seed >= 1 << 63 else seed
