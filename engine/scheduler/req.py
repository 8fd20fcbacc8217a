"""Req: one request's state inside the scheduler."""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Optional

import torch

from engine.constrained.base import GrammarMatcher
from engine.io_struct import BatchTokenOutput
from engine.sampling.sampling_params import SamplingParams


class Req:
    def __init__(self, rid: str, input_ids: list[int], params: SamplingParams, seed: int, *,
                 return_logprob: bool = False, top_logprobs_num: int = 0, logprob_start_len: int = -1,
                 stream: bool = False, eos_token_ids: frozenset[int] = frozenset(), arrival_time: float = 0.0) -> None:
        self.rid = rid
        self.origin_input_ids = input_ids
        self.params = params
        self.seed = seed
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.stream = stream
        self.eos_token_ids = eos_token_ids
        self.arrival_time = arrival_time or time.monotonic()
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids)

        self.output_ids: list[int] = []
        self.finished_reason: Optional[dict[str, Any]] = None
        # Overlap scheduling: tokens sampled on the device but not read yet (0, 1, or 2 for a
        # moment), the newest of them in the runner's future-token slot ``future_idx``.
        self.pending = 0
        self.future_idx = -1

        # Constrained decoding: the compile in flight (the request waits), then the matcher,
        # which has accepted every output token so far (it survives retraction untouched).
        self.grammar_future: Optional[Future] = None
        self.grammar: Optional[GrammarMatcher] = None

        # KV state. Positions [0, kv_len) of this request have KV in row req_pool_idx;
        # the first len(prefix_indices) of them belong to the radix tree (locked at last_node).
        self.req_pool_idx: Optional[int] = None
        self.prefix_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.last_node: Any = None
        self.kv_len = 0
        self.last_loc = -1           # slot of position kv_len - 1 (kept on the host; -1: none)
        self.extend_len = 0          # new tokens in the current extend step
        self.cached_tokens = 0       # prompt tokens served from the cache (first prefill)
        self.counted_cache = False
        self.num_retractions = 0
        # speculative decoding: the request's tokens as an array for the n-gram search
        self.token_history: Optional[Any] = None

        # output bookkeeping: what has been sent to the front end
        self.sent_len = 0
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        self.sent_logprob_len = 0

        # Prompt logprobs (SGLang's input_token_logprobs): one entry per prompt position from
        # logprob_start_len on (-1: none); position 0 has none (None). prompt_logprob_pos is the
        # next position whose logits score the prompt token after it, advanced when an extend
        # step is built, so a request retracted mid-prompt never scores a token twice.
        self.logprob_start_len = logprob_start_len
        wants = logprob_start_len >= 0
        self.prompt_logprob_pos = max(logprob_start_len - 1, 0) if wants else len(input_ids) - 1
        first = [None] if logprob_start_len == 0 else []
        self.input_logprobs: list[Optional[float]] = list(first)
        self.input_top_logprobs: list[Optional[list[tuple[float, int]]]] = list(first)
        self.sent_input_logprob_len = 0

    # tokens the request needs KV for: prompt plus generated (the newest one is fed next)
    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Some prompt token still needs its logprob (the cache must not skip its position)."""
        return self.prompt_logprob_pos < len(self.origin_input_ids) - 1

    @property
    def max_prefix_len(self) -> int:
        """The longest cached prefix this request may reuse: the last token is always fed, and a
        position whose logits score a prompt token must be computed, not read from the cache."""
        n = len(self.fill_ids) - 1
        return min(n, self.prompt_logprob_pos) if self.wants_prompt_logprobs else n

    @property
    def prompt_only(self) -> bool:
        """max_new_tokens 0: the prompt is run for its logprobs, nothing is sampled."""
        return self.params.max_new_tokens == 0

    @property
    def num_out(self) -> int:
        """Tokens generated so far, counting those not read back from the device yet."""
        return len(self.output_ids) + self.pending

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + self.num_out

    @property
    def next_input_id(self) -> int:
        """The token to feed next: a known id, or -(slot + 1) naming a future-token slot."""
        return -(self.future_idx + 1) if self.pending else self.output_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def is_prefilling(self) -> bool:
        """Still has prompt (or resumed) tokens without KV, beyond the last one to feed."""
        return self.kv_len < self.seq_len - 1 or not self.num_out

    def output_due(self, stream_interval: int) -> bool:
        """Whether there is something to send after the latest tokens: when finished, and for a
        stream its first token and then every ``stream_interval`` (--stream-interval) tokens."""
        return self.finished or (self.stream and (self.sent_len == 0 or
                                                  len(self.output_ids) - self.sent_len >= stream_interval))

    def reset_kv(self) -> None:
        self.req_pool_idx = None
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None
        self.kv_len = 0
        self.last_loc = -1

    def __repr__(self) -> str:
        return (f"Req(rid={self.rid}, prompt={len(self.origin_input_ids)}, "
                f"out={len(self.output_ids)}, kv={self.kv_len})")


def take_new_outputs(reqs: list[Req]) -> BatchTokenOutput:
    """What each request has to send since its last output (tokens, logprobs, finish reason, usage),
    as one BatchTokenOutput; marks it sent."""
    out = BatchTokenOutput(rids=[], new_token_ids=[], finished_reasons=[], prompt_tokens=[],
                           completion_tokens=[], cached_tokens=[], input_token_logprobs=[],
                           input_top_logprobs=[])
    for r in reqs:
        out.rids.append(r.rid)
        out.new_token_ids.append(r.output_ids[r.sent_len:])
        out.finished_reasons.append(r.finished_reason)
        out.prompt_tokens.append(len(r.origin_input_ids))
        out.completion_tokens.append(len(r.output_ids))
        out.cached_tokens.append(r.cached_tokens)
        out.output_token_logprobs.append(r.output_logprobs[r.sent_logprob_len:])
        out.output_top_logprobs.append(r.output_top_logprobs[r.sent_logprob_len:])
        out.input_token_logprobs.append(r.input_logprobs[r.sent_input_logprob_len:])
        out.input_top_logprobs.append(r.input_top_logprobs[r.sent_input_logprob_len:])
        r.sent_len = len(r.output_ids)
        r.sent_logprob_len = len(r.output_logprobs)
        r.sent_input_logprob_len = len(r.input_logprobs)
    return out
