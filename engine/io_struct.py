"""Typed messages between the front end (TokenizerManager) and the scheduler.

One message type per direction and purpose; they travel over a thread queue (offline
Engine) or ZeroMQ (server), so they stay plain picklable dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from engine.sampling.sampling_params import SamplingParams


# ---- API layer -> TokenizerManager ---------------------------------------------------------
@dataclass
class GenerateRequest:
    """One prompt, one sample (front ends expand batches and n > 1 into several of these)."""
    text: Optional[str] = None
    input_ids: Optional[list[int]] = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    rid: Optional[str] = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = True


# ---- front end -> scheduler ---------------------------------------------------------------
@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False
    arrival_time: float = 0.0


@dataclass
class AbortReq:
    rid: Optional[str] = None      # None: abort everything
    abort_all: bool = False


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetStatsReq:
    pass


# ---- scheduler -> front end ---------------------------------------------------------------
@dataclass
class BatchTokenOutput:
    """New tokens for a set of requests since the last output of each."""
    rids: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[Optional[dict[str, Any]]]    # None while running
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # per request, per new token (empty lists when logprobs were not asked for)
    output_token_logprobs: list[list[float]] = field(default_factory=list)
    output_top_logprobs: list[list[list[tuple[float, int]]]] = field(default_factory=list)


@dataclass
class FlushCacheOutput:
    success: bool
    message: str = ""


@dataclass
class SchedulerStats:
    num_running_reqs: int
    num_queue_reqs: int
    token_usage: float            # used KV slots / capacity
    cache_hit_rate: float         # cached prompt tokens / prompt tokens, since start
    max_total_tokens: int
    available_tokens: int         # free + evictable
    evictable_tokens: int
    num_retractions: int = 0
    num_evicted_tokens: int = 0
    gen_throughput: float = 0.0
    # the raw counts behind cache_hit_rate, so that replicas' rates can be merged exactly
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    # with data parallelism: each replica's own stats, in dp_rank order (the fields above are
    # their merge); empty otherwise
    replicas: list["SchedulerStats"] = field(default_factory=list)


@dataclass
class SchedulerInfo:
    """Sent once at startup: what the scheduler chose."""
    max_total_tokens: int
    max_running_requests: int
    context_length: int
    vocab_size: int
    device: str
    dtype: str
    attention_backend: str
    sampling_backend: str


@dataclass
class SchedulerError:
    """The scheduler hit an unrecoverable error (the front end answers 503 and exits)."""
    message: str
