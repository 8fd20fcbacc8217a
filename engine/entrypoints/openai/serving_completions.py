"""POST /v1/completions: prompts (text or token ids) x n generations → OpenAI's legacy
completion answer, whole or streamed; choice index = prompt_i * n + j.

echo prepends the prompt text; with logprobs, the prompt's positions come first, each token's
logprob given the tokens before it (null for the first, as OpenAI does). max_tokens 0 with echo
and logprobs scores the prompt alone (what lm-eval-harness's loglikelihood tasks send)."""
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
                                  return_logprob=want_logprobs, top_logprobs_num=req.logprobs or 0,
                                  logprob_start_len=0 if req.echo and want_logprobs else None)
    fan = FanOut(ctx.tm, reqs, ctx.inflight)
    await common.start(fan, request)
    echoes = [_echo_text(ctx.tm, p) if req.echo else None for p in req.prompt]
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
            logprobs, offset = _prompt_logprobs(meta, req.logprobs or 0, echo) if echo is not None \
                else (CompletionLogprobs(), 0)
            _add_logprobs(logprobs, meta, 0, offset, req.logprobs or 0)
        choices.append(CompletionChoice(index=k, text=(echo or "") + out["text"],
                                        logprobs=logprobs, finish_reason=common.finish_reason(meta)))
    usage = common.usage([o["meta_info"] for o in outs], req.n)
    return JSONResponse(CompletionResponse(choices=choices, usage=usage, **head).model_dump())


def _echo_text(tm: Any, prompt: PromptItem) -> str:
    return prompt if isinstance(prompt, str) else tm.tokenizer.decode(prompt)


def _prompt_logprobs(meta: dict, top_n: int, echo: str) -> tuple[CompletionLogprobs, int]:
    """The echoed prompt's positions: its tokens as the model saw them, each one's logprob and
    top_n alternatives given the tokens before it (null for the first token); and the text offset
    of the first generated token (after the echo, and after the prompt tokens' texts, which a
    BOS token can make longer than the echo)."""
    lp = CompletionLogprobs()
    tops = meta.get("input_top_logprobs") or []
    offset = 0
    for i, (logprob, _tid, text) in enumerate(meta.get("input_token_logprobs") or []):
        text = text or ""
        top = tops[i] if i < len(tops) else None
        lp.tokens.append(text)
        lp.token_logprobs.append(None if logprob is None else common.clamp(logprob))
        lp.top_logprobs.append(None if logprob is None else
                               {(t or ""): common.clamp(l) for l, _id, t in (top or [])[:top_n]})
        lp.text_offset.append(offset)
        offset += len(text)
    return lp, max(offset, len(echo))


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
                  echoes: list[Optional[str]]) -> AsyncIterator[bytes]:
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
                if echo is not None:   # the prompt's logprobs came with the first token
                    delta = echo + delta
                    offsets[k] = len(echo)
                    if req.logprobs is not None:
                        logprobs, offsets[k] = _prompt_logprobs(meta, req.logprobs, echo)
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
