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
    # SGLang's: with return_logprob, the logprobs of the prompt tokens from this position on.
    # None: none; -1 (SGLang's default): the last prompt token's only.
    logprob_start_len: Optional[int] = None
    return_text_in_logprobs: bool = True


# ---- front end -> scheduler ---------------------------------------------------------------
@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1     # -1: no prompt logprobs; else < len(input_ids)
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
    # per request, per new prompt position (None: the first prompt token, which has no logprob)
    input_token_logprobs: list[list[Optional[float]]] = field(default_factory=list)
    input_top_logprobs: list[list[Optional[list[tuple[float, int]]]]] = field(default_factory=list)


@dataclass
class FlushCacheOutput:
    success: bool
    message: str = ""


@dataclass
class StepTotals:
    """Seconds, steps and tokens (new prompt tokens, or decoded sequences) per kind of step."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    mixed_decode_tokens: int = 0    # tokens decoded inside prefill steps (--enable-mixed-chunk)
    piecewise_prefill_steps: int = 0   # prefill steps replayed as graph pieces (--enable-piecewise-cuda-graph)

    def add(self, kind: str, seconds: float, tokens: int) -> None:
        setattr(self, f"{kind}_seconds", getattr(self, f"{kind}_seconds") + seconds)
        setattr(self, f"{kind}_steps", getattr(self, f"{kind}_steps") + 1)
        setattr(self, f"{kind}_tokens", getattr(self, f"{kind}_tokens") + tokens)

    def __add__(self, other: "StepTotals") -> "StepTotals":
        return StepTotals(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})

    def __sub__(self, other: "StepTotals") -> "StepTotals":
        return StepTotals(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})

    def describe(self) -> str:
        """One line: prefill and decode time, steps and rates."""
        parts = []
        if self.prefill_steps:
            parts.append(f"prefill {self.prefill_seconds:.2f} s in {self.prefill_steps} steps "
                         f"({self.prefill_tokens / max(self.prefill_seconds, 1e-9):,.0f} prompt tok/s"
                         + (f", {self.mixed_decode_tokens:,} tokens decoded in them" if self.mixed_decode_tokens
                            else "")
                         + (f", {self.piecewise_prefill_steps} as graph pieces" if self.piecewise_prefill_steps
                            else "") + ")")
        if self.decode_steps:
            parts.append(f"decode {self.decode_seconds:.2f} s in {self.decode_steps} steps "
                         f"({1e3 * self.decode_seconds / self.decode_steps:.2f} ms/step, mean batch "
                         f"{self.decode_tokens / self.decode_steps:.1f})")
        return "; ".join(parts) or "no steps"


@dataclass
class SpecCounts:
    """Speculative decoding's counters (engine/speculative/decoder.py), since the start."""
    req_steps: int = 0          # (request, decode step) pairs while speculative decoding is on
    verify_steps: int = 0       # forward steps that verified drafts
    verifications: int = 0      # (request, verify step) pairs with at least one draft
    draft_tokens: int = 0       # drafts proposed in them
    # drafts accepted, as tokens emitted beyond one per request and step (a request that finishes
    # on an accepted draft counts the drafts before it)
    accepted_tokens: int = 0

    @property
    def accept_length(self) -> float:
        """Tokens emitted per request and decode step, 1.0 when no draft was ever accepted
        (SGLang's 'accept len')."""
        return (self.req_steps + self.accepted_tokens) / max(1, self.req_steps)

    @property
    def accepted_per_verification(self) -> float:
        """Accepted drafts per request verified (out of up to --speculative-num-draft-tokens)."""
        return self.accepted_tokens / max(1, self.verifications)

    def __add__(self, other: "SpecCounts") -> "SpecCounts":
        return SpecCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})


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
    step_totals: StepTotals = field(default_factory=StepTotals)   # where the time went, since start
    spec: Optional[SpecCounts] = None     # speculative decoding's counters; None when it is off
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
    kv_cache_dtype: str = ""      # the pool's torch dtype, e.g. bfloat16, float8_e4m3fn


@dataclass
class SchedulerError:
    """The scheduler hit an unrecoverable error (the front end answers 503 and exits)."""
    message: str
