"""POST /v1/chat/completions: messages → chat template → n generations → OpenAI's answer,
whole or streamed as chat.completion.chunk events."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.openai import serving_common as common
from engine.entrypoints.openai.chat_output import (AnswerParsers, AnswerStreamer, answer_parsers,
                                                   count_reasoning_tokens, parse_answer)
from engine.entrypoints.openai.context import ApiContext
from engine.entrypoints.openai.errors import APIError, from_value_error
from engine.entrypoints.openai.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                                ChatCompletionRequest, ChatCompletionResponse,
                                                ChatLogprobs, ChatResponseMessage, CompletionTokensDetails,
                                                TokenLogprob, TopLogprob, UsageInfo)
from engine.entrypoints.fanout import FanOut
from engine.entrypoints.openai.streaming import SSE_DONE, SSEResponse, sse
from engine.entrypoints.openai.tool_calls import plan_tools


async def create_chat_completion(ctx: ApiContext, request: Request) -> Response:
    ctx.ensure_alive()
    req = await common.parse_body(request, ChatCompletionRequest)
    ctx.check_model(req.model)
    tm = ctx.tm
    try:
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, ctx.tool_parser_name,
                          getattr(ctx.server_args, "grammar_backend", "none"))
        messages = [m.to_template_dict() for m in req.messages]
        prompt_ids = tm.apply_chat_template(messages, plan.template_tools,
                                            template_kwargs=req.chat_template_kwargs)
        max_new = req.requested_max_tokens
        if max_new is None:     # OpenAI's default: as much as the context leaves
            max_new = max(tm.context_len - len(prompt_ids), 1)
        base_sp = req.sampling_params(max_new, ctx.grammar_enabled)
        if plan.parser is not None and plan.parser.keeps_special_tokens:
            base_sp["skip_special_tokens"] = False      # the call marker is a special token
        constrained = any(base_sp.get(k) is not None for k in ("json_schema", "regex", "ebnf"))
        if plan.ebnf is not None:
            if constrained:
                raise ValueError("tool_choice that forces a tool call cannot be combined with "
                                 "response_format, json_schema, regex or ebnf")
            base_sp["ebnf"], constrained = plan.ebnf, True
        parsers = answer_parsers(ctx.reasoning_parser_name, req.separate_reasoning, req.chat_template_kwargs,
                                 plan.parser, constrained)
    except ValueError as e:
        raise from_value_error(e) from None
    except TemplateError as e:      # the template's own checks, e.g. roles must alternate
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    rid = tm.new_rid()
    reqs = common.sample_requests([prompt_ids], req.n, base_sp, rid, req.stream,
                                  return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0)
    fan = FanOut(tm, reqs, ctx.inflight)
    await common.start(fan, request)
    head = dict(id=f"chatcmpl-{rid}", created=int(time.time()), model=req.model,
                system_fingerprint=ctx.system_fingerprint)
    end_id = ctx.single_token_id(parsers.reasoning.end_tag) if parsers.reasoning else None
    if req.stream:
        return SSEResponse(_stream(fan, req, head, parsers, end_id))

    outs = await common.finals(fan, request)
    choices, answers = [], []
    for i, out in enumerate(outs):
        meta = out["meta_info"]
        err = common.abort_error(meta)
        if err is not None:
            raise err
        ans = parse_answer(parsers, out["text"])
        answers.append((ans.in_reasoning, out.get("output_ids") or []))
        reason = common.finish_reason(meta)
        choices.append(ChatChoice(
            index=i, message=ChatResponseMessage(content=ans.content, tool_calls=ans.tool_calls or None,
                                                 reasoning_content=ans.reasoning),
            logprobs=_logprobs(meta, 0) if req.logprobs else None,
            finish_reason="tool_calls" if ans.tool_calls and reason == "stop" else reason))
    usage = _usage([o["meta_info"] for o in outs], req.n, count_reasoning_tokens(parsers, end_id, answers))
    return JSONResponse(ChatCompletionResponse(choices=choices, usage=usage, **head).model_dump())


def _usage(metas: list[Optional[dict]], n: int, reasoning_tokens: Optional[int]) -> UsageInfo:
    """Usage, with completion_tokens_details when the reasoning tokens are known."""
    usage = common.usage(metas, n)
    if reasoning_tokens is not None:
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
    return usage


def _logprobs(meta: dict, start: int) -> ChatLogprobs:
    toks, tops = common.logprob_entries(meta, start)
    content = []
    for (lp, _tid, text), top in zip(toks, tops):
        text = text or ""
        content.append(TokenLogprob(
            token=text, logprob=common.clamp(lp), bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=t or "", logprob=common.clamp(l), bytes=list((t or "").encode()))
                          for l, _id, t in top]))
    return ChatLogprobs(content=content)


async def _stream(fan: FanOut, req: ChatCompletionRequest, head: dict[str, Any],
                  parsers: AnswerParsers, end_id: Optional[int]) -> AsyncIterator[bytes]:
    n = len(fan.reqs)
    streamers = [AnswerStreamer(parsers, req.stream_reasoning) for _ in range(n)]
    sent_logprobs = [0] * n
    texts = [""] * n
    metas: list[Optional[dict]] = [None] * n
    output_ids: list[list[int]] = [[] for _ in range(n)]

    def chunk(choices: list[ChatChunkChoice], usage: Optional[UsageInfo] = None) -> bytes:
        d = ChatCompletionChunk(choices=choices, usage=usage, **head).model_dump()
        if not req.include_usage:
            d.pop("usage")
        return sse(d)

    try:
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        async for i, out in fan.updates():
            meta = metas[i] = out["meta_info"]
            closing = common.abort_events(meta)
            if closing is not None:
                texts[i] = out.get("text") or texts[i]
                for j, streamer in enumerate(streamers):
                    held = streamer.held_reasoning(texts[j])
                    if held:
                        yield chunk([ChatChunkChoice(index=j, delta={"reasoning_content": held})])
                for event in closing:
                    yield event
                return
            texts[i] = out["text"]
            reason = common.finish_reason(meta)
            output_ids[i] = out.get("output_ids") or output_ids[i]
            thought, delta, calls = streamers[i].update(out["text"], final=reason is not None)
            logprobs = None
            if req.logprobs:
                logprobs = _logprobs(meta, sent_logprobs[i])
                sent_logprobs[i] += len(logprobs.content)
            if thought:     # a chunk of its own: clients read one kind of text per delta
                yield chunk([ChatChunkChoice(index=i, delta={"reasoning_content": thought},
                                             logprobs=None if delta or calls else logprobs)])
            if delta or calls or (logprobs and logprobs.content and not thought):
                d: dict[str, Any] = {"content": delta} if delta or not calls else {}
                if calls:
                    d["tool_calls"] = calls
                yield chunk([ChatChunkChoice(index=i, delta=d, logprobs=logprobs)])
            if reason:
                if streamers[i].has_calls and reason == "stop":
                    reason = "tool_calls"
                yield chunk([ChatChunkChoice(index=i, delta={}, finish_reason=reason)])
        if req.include_usage:
            answers = [(s.in_reasoning, ids) for s, ids in zip(streamers, output_ids)]
            yield chunk([], usage=_usage(metas, req.n, count_reasoning_tokens(parsers, end_id, answers)))
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield common.stream_error(fan, e, head["id"])
    finally:
        fan.close()
