"""What a launched step carries until its outputs are read back: the sampled requests, the host
copy of their tokens and logprobs, and an extend step's prompt logprobs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.runner.forward_batch import PromptLogprobs
from engine.scheduler.req import Req
from hal.platform import HostCopy


@dataclass
class PromptPart:
    """An extend step's prompt logprobs: how many rows each request got, in batch order, and
    the max_new_tokens=0 requests whose prompt this step completed (they finish when read)."""
    counts: list[tuple[Req, int]]
    finishing: list[Req]
    logprobs: Optional[PromptLogprobs]

    @property
    def tensors(self) -> list[Optional[torch.Tensor]]:
        lp = self.logprobs
        return [None, None, None] if lp is None else [lp.values, lp.top_values, lp.top_ids]


@dataclass
class InFlight:
    """A launched step's sampled requests and the host copy of its outputs (the sampled tokens,
    their logprobs, then the prompt part's logprobs)."""
    reqs: list[Req]
    copy: HostCopy
    kind: str           # PREFILL or DECODE, for the step clock
    tokens: int         # new prompt tokens, or decoded sequences
    prompt: Optional[PromptPart] = None
    mixed_decodes: int = 0   # a prefill step's running requests that decoded in it (mixed chunk)
    in_pieces: bool = False  # the step ran as piecewise graphs
