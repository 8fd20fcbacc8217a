"""POST /v1/completions: prompts (text or token ids) x n generations → OpenAI's legacy
completion answer, whole or streamed; choice index = prompt_i * n + j.

echo prepends the prompt text; with logprobs, the prompt's positions are listed with null
logprobs (this server does not compute prompt logprobs)."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.openai import serving_common as common
from engine.entrypoints.openai.context import ApiContext
from engine.entrypoints.openai.errors import from_value_error
from engine.entrypoints.openai.protocol import (CompletionChoice, CompletionLogprobs,
                                                CompletionRequest, CompletionResponse, PromptItem)
from engine.entrypoints.fanout import FanOut
from engine.entrypoints.openai.streaming import SSE_DONE, SSEResponse, sse


async def create_completion(ctx: ApiContext, request: Request) -> Response:
    ctx.ensure_alive()
    req = await common.parse_body(request, CompletionRequest)
    ctx.check_model(req.model)
    try:
        base_sp = req.sampling_params(req.max_tokens, ctx.grammar_enabled)
    except ValueError as e:
        raise from_value_error(e) from None

    rid = ctx.tm.new_rid()
    want_logprobs = req.logprobs is not None
    reqs = common.sample_requests(req.prompt, req.n, base_sp, rid, req.stream,
                                  return_logprob=want_logprobs, top_logprobs_num=req.logprobs or 0)
    fan = FanOut(ctx.tm, reqs, ctx.inflight)
    await common.start(fan, request)
    echoes = [_Echo(ctx.tm, p, want_logprobs) if req.echo else None for p in req.prompt]
    head = dict(id=f"cmpl-{rid}", created=int(time.time()), model=req.model,
                system_fingerprint=ctx.system_fingerprint)
    if req.stream:
        return SSEResponse(_stream(fan, req, head, echoes))

    outs = await common.finals(fan, request)
    choices = []
    for k, out in enumerate(outs):
        meta = out["meta_info"]
        err = common.abort_error(meta)
        if err is not None:
            raise err
        echo = echoes[k // req.n]
        logprobs = None
        if want_logprobs:
            logprobs = echo.logprobs() if echo else CompletionLogprobs()
            _add_logprobs(logprobs, meta, 0, len(echo.text) if echo else 0, req.logprobs or 0)
        choices.append(CompletionChoice(index=k, text=(echo.text if echo else "") + out["text"],
                                        logprobs=logprobs, finish_reason=common.finish_reason(meta)))
    usage = common.usage([o["meta_info"] for o in outs], req.n)
    return JSONResponse(CompletionResponse(choices=choices, usage=usage, **head).model_dump())


class _Echo:
    """The prompt as echoed text, and its tokens for logprobs (null logprob per position)."""

    def __init__(self, tm: Any, prompt: PromptItem, with_tokens: bool) -> None:
        tok = tm.tokenizer
        self.text = prompt if isinstance(prompt, str) else tok.decode(prompt)
        self.tokens: list[str] = []
        if with_tokens:
            ids = prompt if isinstance(prompt, list) else tok.encode(prompt, add_special_tokens=False)
            self.tokens = [tok.decode([t]) for t in ids]

    def logprobs(self) -> CompletionLogprobs:
        offsets, pos = [], 0
        for t in self.tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(tokens=list(self.tokens), token_logprobs=[None] * len(self.tokens),
                                  top_logprobs=[None] * len(self.tokens), text_offset=offsets)


def _add_logprobs(lp: CompletionLogprobs, meta: dict, start: int, offset: int,
                  top_n: int) -> tuple[int, int]:
    """Append output positions from `start`; `offset` is where they begin in the choice's
    text. Returns the number of positions added and the offset after them."""
    toks, tops = common.logprob_entries(meta, start)
    for (logprob, _tid, text), top in zip(toks, tops):
        text = text or ""
        lp.tokens.append(text)
        lp.token_logprobs.append(common.clamp(logprob))
        lp.top_logprobs.append({(t or ""): common.clamp(l) for l, _id, t in top[:top_n]} if top_n else {})
        lp.text_offset.append(offset)
        offset += len(text)
    return len(toks), offset


async def _stream(fan: FanOut, req: CompletionRequest, head: dict[str, Any],
                  echoes: list[Optional[_Echo]]) -> AsyncIterator[bytes]:
    n = len(fan.reqs)
    sent_text = [""] * n
    sent_logprobs = [0] * n
    offsets = [0] * n
    started = [False] * n
    metas: list[Optional[dict]] = [None] * n

    def chunk(choices: list[CompletionChoice], usage: Any = None) -> bytes:
        d = CompletionResponse(choices=choices, usage=usage, **head).model_dump()
        if not req.include_usage:
            d.pop("usage")
        return sse(d)

    try:
        async for k, out in fan.updates():
            meta = metas[k] = out["meta_info"]
            closing = common.abort_events(meta)
            if closing is not None:
                for event in closing:
                    yield event
                return
            delta = common.new_text(sent_text, k, out["text"])
            echo = echoes[k // req.n]
            logprobs = None
            if not started[k]:
                started[k] = True
                if echo is not None:
                    delta = echo.text + delta
                    offsets[k] = len(echo.text)
                    logprobs = echo.logprobs() if req.logprobs is not None else None
            if req.logprobs is not None:
                logprobs = logprobs or CompletionLogprobs()
                added, offsets[k] = _add_logprobs(logprobs, meta, sent_logprobs[k], offsets[k],
                                                  req.logprobs)
                sent_logprobs[k] += added
            reason = common.finish_reason(meta)
            if delta or reason or (logprobs and logprobs.tokens):
                yield chunk([CompletionChoice(index=k, text=delta, logprobs=logprobs,
                                              finish_reason=reason)])
        if req.include_usage:
            yield chunk([], usage=common.usage(metas, req.n))
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield common.stream_error(fan, e, head["id"])
    finally:
        fan.close()
