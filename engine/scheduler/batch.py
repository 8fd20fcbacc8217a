"""Turn the scheduler's chosen requests into a ForwardBatch and a SamplingBatchInfo."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.runner.forward_batch import ForwardBatch, ForwardMode
from engine.runner.host_to_device import to_device
from engine.sampling.sampling_batch_info import SamplingBatchInfo
from engine.scheduler.req import Req


def take_prompt_logprob_spans(reqs: list[Req]) -> Optional[list[tuple[int, int]]]:
    """Per request of an extend step, the positions [lo, hi) whose logits score the prompt token
    after each; advances the requests past them. None when no request wants prompt logprobs."""
    if not any(r.wants_prompt_logprobs for r in reqs):
        return None
    spans = []
    for r in reqs:
        lo = r.prompt_logprob_pos
        hi = min(r.kv_len + r.extend_len, len(r.origin_input_ids) - 1)
        if not r.wants_prompt_logprobs or hi <= lo:
            spans.append((lo, lo))
            continue
        assert lo >= r.kv_len, f"{r.rid}: prompt logprob position {lo} is in the cached prefix"
        r.prompt_logprob_pos = hi
        spans.append((lo, hi))
    return spans


def _extend(reqs: list[Req], new_tokens: list[list[int]], out_cache_loc: torch.Tensor, device: torch.device,
            all_logits: bool, extra: Optional[dict[str, torch.Tensor]] = None, top_k: int = 0) -> ForwardBatch:
    """An extend step: each req feeds ``new_tokens[i]`` at positions kv_len onwards, over its cached
    KV (causal among the new tokens); logits at each req's last position, or at every position.
    A negative token id names a future-token slot (a token sampled by the step in flight)."""
    input_ids = [t for toks in new_tokens for t in toks]
    extend_lens = [len(toks) for toks in new_tokens]
    prefix_lens = [r.kv_len for r in reqs]
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    positions = [pos for p, n in zip(prefix_lens, extend_lens) for pos in range(p, p + n)]
    ext = torch.tensor(extend_lens, dtype=torch.int64)
    host = {"input_ids": torch.tensor(input_ids, dtype=torch.int64),
            "positions": torch.tensor(positions, dtype=torch.int64),
            "req_pool_indices": torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64),
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int64), "out_cache_loc": out_cache_loc,
            "extend_prefix_lens": torch.tensor(prefix_lens, dtype=torch.int64), "extend_seq_lens": ext,
            **({} if all_logits else {"logits_indices": torch.cumsum(ext, 0) - 1}), **(extra or {})}
    dev = {k: to_device(v, device) for k, v in host.items()}
    return ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=len(reqs), seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=prefix_lens, extend_seq_lens_cpu=extend_lens, host_tensors=host,
        prompt_top_logprobs_num=top_k, has_future_inputs=bool(input_ids) and min(input_ids) < 0, **dev)


def build_extend_batch(reqs: list[Req], out_cache_loc: torch.Tensor, device: torch.device,
                       prompt_spans: Optional[list[tuple[int, int]]] = None,
                       decoding: Sequence[Req] = ()) -> ForwardBatch:
    """Each req computes fill_ids[kv_len : kv_len + extend_len]. ``out_cache_loc`` on the host.
    ``prompt_spans``: from take_prompt_logprob_spans. ``decoding``: running requests that decode
    one token in the same pass (--enable-mixed-chunk), after ``reqs``: each feeds its newest token
    (maybe still on the device) as a one-token extend over its cache."""
    lp_rows: list[int] = []
    lp_targets: list[int] = []
    top_k, row0 = 0, 0
    for i, r in enumerate(reqs):
        if prompt_spans is not None and prompt_spans[i][1] > prompt_spans[i][0]:
            lo, hi = prompt_spans[i]
            lp_rows.extend(range(row0 + lo - r.kv_len, row0 + hi - r.kv_len))
            lp_targets.extend(r.origin_input_ids[lo + 1: hi + 1])
            top_k = max(top_k, r.top_logprobs_num)
        row0 += r.extend_len
    extra = {}
    if lp_rows:
        extra = {"prompt_logprob_rows": torch.tensor(lp_rows, dtype=torch.int64),
                 "prompt_logprob_targets": torch.tensor(lp_targets, dtype=torch.int64)}
    new_tokens = [r.fill_ids[r.kv_len: r.kv_len + r.extend_len] for r in reqs]
    new_tokens += [[r.next_input_id] for r in decoding]
    fb = _extend([*reqs, *decoding], new_tokens, out_cache_loc, device, all_logits=False, extra=extra, top_k=top_k)
    fb.mixed_decodes = len(decoding)
    return fb


def build_decode_batch(reqs: list[Req], out_cache_loc: torch.Tensor, device: torch.device) -> ForwardBatch:
    """Each req feeds its newest token (maybe still on the device) at position seq_len - 1. The
    five per-request rows travel to the device in one copy (from pinned memory, not waiting for
    the device). ``out_cache_loc`` on the host."""
    seq_lens = [r.seq_len for r in reqs]
    input_ids = [r.next_input_id for r in reqs]
    rows = [input_ids, [s - 1 for s in seq_lens], [r.req_pool_idx for r in reqs], seq_lens, out_cache_loc.tolist()]
    packed = torch.tensor(rows, dtype=torch.int64)  # [5, B]
    names = ("input_ids", "positions", "req_pool_indices", "seq_lens", "out_cache_loc")
    host = dict(zip(names, packed))
    dev = dict(zip(names, to_device(packed, device)))
    return ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=len(reqs), seq_lens_cpu=seq_lens, host_tensors=host,
        has_future_inputs=min(input_ids) < 0, logits_indices=None, **dev)  # None: every row


def build_verify_batch(reqs: list[Req], drafts: list[list[int]], out_cache_loc: torch.Tensor,
                       device: torch.device) -> ForwardBatch:
    """A speculative verify step: each req feeds [its newest token, *its drafts] at positions
    kv_len onwards, an extend over its cached KV, with logits at every position. ``out_cache_loc``
    on the host, len(drafts[i]) + 1 slots per request."""
    return _extend(reqs, [[r.output_ids[-1], *d] for r, d in zip(reqs, drafts)], out_cache_loc, device,
                   all_logits=True)


def build_sampling_info(reqs: list[Req], vocab_size: int, device: torch.device,
                        offsets: Optional[list[int]] = None) -> SamplingBatchInfo:
    """``offsets``: row i samples output position reqs[i].num_out + offsets[i] (a speculative verify
    step, where a request has one row per position); None: every row samples its request's next."""
    steps = [r.num_out for r in reqs] if offsets is None else [r.num_out + o for r, o in zip(reqs, offsets)]
    banned = []
    for r, step in zip(reqs, steps):
        # A grammar decides where its document ends: its stop tokens are never banned.
        below_min = step < r.params.min_new_tokens and r.grammar is None
        banned.append(sorted(r.stop_token_ids) if below_min else [])
    return SamplingBatchInfo.build(
        [r.params for r in reqs], seeds=[r.seed for r in reqs], steps=steps,
        output_ids=[r.output_ids for r in reqs], prompt_ids=[r.origin_input_ids for r in reqs],
        banned_token_ids=banned, top_logprobs_nums=[r.top_logprobs_num for r in reqs],
        return_logprob=[r.return_logprob for r in reqs], vocab_size=vocab_size, device=device,
        pending=[r.pending > 0 for r in reqs])
