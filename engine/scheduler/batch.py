"""Turn the scheduler's chosen requests into a ForwardBatch and a SamplingBatchInfo."""
from __future__ import annotations

import torch

from engine.runner.forward_batch import ForwardBatch, ForwardMode
from engine.sampling.sampling_batch_info import SamplingBatchInfo
from engine.scheduler.req import Req


def _t(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def build_extend_batch(reqs: list[Req], out_cache_loc: torch.Tensor, device: torch.device) -> ForwardBatch:
    """Each req computes fill_ids[kv_len : kv_len + extend_len]."""
    input_ids: list[int] = []
    positions: list[int] = []
    prefix_lens, extend_lens, seq_lens = [], [], []
    for r in reqs:
        start, end = r.kv_len, r.kv_len + r.extend_len
        input_ids.extend(r.fill_ids[start:end])
        positions.extend(range(start, end))
        prefix_lens.append(start)
        extend_lens.append(r.extend_len)
        seq_lens.append(end)
    ext = torch.tensor(extend_lens, dtype=torch.int64)
    logits_indices = torch.cumsum(ext, 0) - 1
    return ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=len(reqs), input_ids=_t(input_ids, device),
        positions=_t(positions, device), req_pool_indices=_t([r.req_pool_idx for r in reqs], device),
        seq_lens=_t(seq_lens, device), out_cache_loc=out_cache_loc, seq_lens_cpu=seq_lens,
        extend_prefix_lens=_t(prefix_lens, device), extend_seq_lens=ext.to(device),
        extend_prefix_lens_cpu=prefix_lens, extend_seq_lens_cpu=extend_lens,
        logits_indices=logits_indices.to(device))


def build_decode_batch(reqs: list[Req], out_cache_loc: torch.Tensor, device: torch.device) -> ForwardBatch:
    """Each req feeds its newest token at position seq_len - 1. The four per-request rows travel
    to the device in one copy (from pinned memory, not waiting for the device)."""
    seq_lens = [r.seq_len for r in reqs]
    rows = [[r.output_ids[-1] for r in reqs], [s - 1 for s in seq_lens], [r.req_pool_idx for r in reqs],
            seq_lens]
    packed = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type != "cpu")  # [4, B]
    input_ids, positions, req_pool_indices, seq_lens_t = packed.to(device, non_blocking=True)
    return ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=len(reqs), input_ids=input_ids, positions=positions,
        req_pool_indices=req_pool_indices, seq_lens=seq_lens_t, out_cache_loc=out_cache_loc,
        seq_lens_cpu=seq_lens, logits_indices=None)  # None: every row (one token per request)


def build_sampling_info(reqs: list[Req], vocab_size: int, device: torch.device) -> SamplingBatchInfo:
    banned = []
    for r in reqs:
        # A grammar decides where its document ends: its stop tokens are never banned.
        below_min = len(r.output_ids) < r.params.min_new_tokens and r.grammar is None
        banned.append(sorted(r.stop_token_ids) if below_min else [])
    return SamplingBatchInfo.build(
        [r.params for r in reqs], seeds=[r.seed for r in reqs], steps=[len(r.output_ids) for r in reqs],
        output_ids=[r.output_ids for r in reqs], prompt_ids=[r.origin_input_ids for r in reqs],
        banned_token_ids=banned, top_logprobs_nums=[r.top_logprobs_num for r in reqs],
        return_logprob=[r.return_logprob for r in reqs], vocab_size=vocab_size, device=device)
