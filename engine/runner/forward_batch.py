"""ForwardBatch: everything one model step needs, already on the device."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from hal.attention import AttentionBackend
    from hal.piecewise_graph import PiecewiseGraphRunner


class ForwardMode(enum.Enum):
    EXTEND = enum.auto()   # new prompt tokens (a whole prompt or a chunk) after a cached prefix
    DECODE = enum.auto()   # one new token per request

    @property
    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class PromptLogprobs:
    """What an extend step computed for ``ForwardBatch.prompt_logprob_rows``, on the device."""
    values: torch.Tensor                        # [n] fp32 log p(target | tokens before it)
    top_values: Optional[torch.Tensor] = None   # [n, k] fp32, when k = prompt_top_logprobs_num > 0
    top_ids: Optional[torch.Tensor] = None      # [n, k] int64


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor          # [num_tokens] int64
    positions: torch.Tensor          # [num_tokens] int64
    req_pool_indices: torch.Tensor   # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor           # [B] int64 tokens in KV after this step (prefix + new)
    out_cache_loc: torch.Tensor      # [num_tokens] int64 KV slots of the new tokens
    seq_lens_cpu: list[int]
    # extend only: tokens already cached, and new tokens, per request
    extend_prefix_lens: Optional[torch.Tensor] = None   # [B] int64
    extend_seq_lens: Optional[torch.Tensor] = None      # [B] int64
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    # rows of the final hidden states to turn into logits: [num_logits] int64
    # (the last token of each request in extend); None: every row (decode, one token per request;
    # a speculative verify step, an extend with logits at every position)
    logits_indices: Optional[torch.Tensor] = None
    # Extend only, for requests that asked for prompt logprobs: the rows of the final hidden
    # states whose logits score the next prompt token, and that token. The LogitsProcessor
    # writes their log-softmax there into ``prompt_logprobs`` (None: no request asked).
    prompt_logprob_rows: Optional[torch.Tensor] = None      # [num_prompt_logprobs] int64
    prompt_logprob_targets: Optional[torch.Tensor] = None   # [num_prompt_logprobs] int64
    prompt_top_logprobs_num: int = 0                        # top-k alternatives per row (the batch's max)
    prompt_logprobs: Optional["PromptLogprobs"] = None
    # Extend only (--enable-mixed-chunk): the last ``mixed_decodes`` requests are running ones
    # that decode one token each in this prefill step; a backend may run decode attention on them.
    mixed_decodes: int = 0
    # Overlap scheduling: input ids < 0 are tokens sampled by an earlier step and still on the
    # device: -(i + 1) is the runner's future-token slot i.
    has_future_inputs: bool = False
    # The n tokens sampled from this step's logits go to future-token slots [base, base + n).
    future_slots: Optional[tuple[int, int]] = None
    # Host copies of tensor fields, for tensor-parallel rank 0 to send without a device read.
    host_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Where to write the fp32 logits ([num_logits, vocab]); None: a fresh tensor. Captured decode
    # steps of every batch size share one such buffer (hal/graph_runner.py).
    logits_out: Optional[torch.Tensor] = None
    attn_backend: Optional["AttentionBackend"] = None
    # Set while a piecewise graph runner warms up or captures the model stack: the attention
    # layers hand q/k/v to it (hal/piecewise_graph.py)
    piecewise: Optional["PiecewiseGraphRunner"] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
