"""Drive a Scheduler directly (no front end): hand it requests, step it until idle, and collect
each request's streamed outputs; every run ends by checking that no KV leaked."""
from __future__ import annotations

from typing import Optional

from engine.io_struct import AbortReq, TokenizedGenerateReq
from engine.scheduler.scheduler import Scheduler


def drive(s: Scheduler, reqs: list[TokenizedGenerateReq], abort_at: Optional[dict[int, list[str]]] = None,
          max_steps: int = 5000) -> dict[str, dict]:
    """Per rid: ids, finish, logprobs / top (output), input / input_top (prompt), cached tokens and
    the number of chunks it was sent in. ``abort_at``: step number -> rids aborted after it."""
    for r in reqs:
        s.handle(r)
    out = {r.rid: {"ids": [], "finish": None, "logprobs": [], "top": [], "input": [], "input_top": [],
                   "cached": 0, "chunks": 0} for r in reqs}
    steps = 0
    while not s.is_idle() or s.outputs:
        s.step()
        steps += 1
        for rid in (abort_at or {}).get(steps, []):
            s.handle(AbortReq(rid=rid))
        o = s.take_outputs()
        for i, rid in enumerate(o.rids if o else []):
            d = out[rid]
            assert d["finish"] is None, f"{rid}: output after finishing"
            d["ids"] += o.new_token_ids[i]
            d["finish"] = o.finished_reasons[i]
            d["logprobs"] += o.output_token_logprobs[i]
            d["top"] += o.output_top_logprobs[i]
            d["input"] += o.input_token_logprobs[i]
            d["input_top"] += o.input_top_logprobs[i]
            d["cached"] = o.cached_tokens[i]
            d["chunks"] += 1
        assert steps < max_steps
    s.check_memory_whole()
    return out
