"""TokenizerManager: the front end's view of the engine.

Validates and tokenizes requests, sends them to the scheduler, turns token outputs back
into text (incremental detokenization, stop strings) and hands each caller its results.
Shared by the offline Engine, the HTTP server and the gRPC server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional

from engine.constrained.base import GrammarError, GrammarKey, backend_class, grammar_key
from engine.entrypoints.scheduler_client import SchedulerClient
from engine.io_struct import (AbortReq, BatchTokenOutput, FlushCacheOutput, FlushCacheReq, GenerateRequest,
                              GetStatsReq, SchedulerError, SchedulerInfo, SchedulerStats,
                              TokenizedGenerateReq)
from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, is_unicode_text
from engine.sampling.stop import StopStringMatcher
from engine.server_args import ServerArgs
from engine.tokenizer import apply_chat_template, load_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _ReqState:
    rid: str
    params: SamplingParams
    prompt_len: int
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    want_logprobs: bool
    created: float
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    logprob_start_len: int = -1     # -1: no prompt logprobs
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    raw_text: str = ""
    text: str = ""
    finish: Optional[dict[str, Any]] = None
    cached_tokens: int = 0
    logprobs: list[list[Any]] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[list[Any]]] = dataclasses.field(default_factory=list)
    input_logprobs: list[Optional[float]] = dataclasses.field(default_factory=list)
    input_top_logprobs: list[Any] = dataclasses.field(default_factory=list)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, client: SchedulerClient, info: SchedulerInfo,
                 metrics: Any = None) -> None:
        self.server_args = server_args
        self.client = client
        self.scheduler_info = info
        self.metrics = metrics
        self.model_path = server_args.model_path
        self.served_model_name = server_args.served_model_name or os.path.basename(
            os.path.normpath(server_args.model_path))
        self.tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path,
                                        trust_remote_code=server_args.trust_remote_code,
                                        chat_template=server_args.chat_template)
        self.context_len = info.context_length
        self.vocab_size = info.vocab_size
        self._states: dict[str, _ReqState] = {}
        self._pending_replies: dict[type, list[asyncio.Future]] = {}
        self._rid_counter = itertools.count()
        self.dead_reason: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        if server_args.grammar_backend != "none":   # so the first constrained request does not wait
            threading.Thread(target=backend_class(server_args.grammar_backend).preload,
                             name="anyserve-grammar-preload", daemon=True).start()

    # -- wiring ------------------------------------------------------------------------------
    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Outputs from the scheduler are delivered on this event loop."""
        self._loop = loop
        self.client.start(lambda obj: loop.call_soon_threadsafe(self._handle_output, obj))

    def is_alive(self) -> bool:
        return self.dead_reason is None and self.client.is_alive()

    def new_rid(self) -> str:
        return f"{uuid.uuid4().hex[:16]}{next(self._rid_counter)}"

    # -- requests ------------------------------------------------------------------------------
    def tokenize(self, req: GenerateRequest) -> list[int]:
        if (req.text is None) == (req.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if req.text is not None:
            if not isinstance(req.text, str):
                raise ValueError(f"text must be a string, got {type(req.text).__name__}")
            if not is_unicode_text(req.text):
                raise ValueError("text holds a lone UTF-16 surrogate, which is not Unicode text")
            ids = self.tokenizer.encode(req.text) if req.text else []
        else:
            ids = req.input_ids
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    for t in ids):
                raise ValueError("input_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"input_ids: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the context length is "
                             f"{self.context_len}: shorten the prompt")
        if len(ids) >= self.scheduler_info.max_total_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the KV cache holds "
                             f"({self.scheduler_info.max_total_tokens})")
        return ids

    def validate(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        params = SamplingParams.from_dict(req.sampling_params)
        if params.n != 1:
            raise ValueError("n must be 1 per generate call (front ends expand n > 1)")
        params.check_vocab(self.vocab_size)
        if not isinstance(req.top_logprobs_num, int) or not 0 <= req.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {req.top_logprobs_num!r}")
        self.check_constraint(params)
        ids = self.tokenize(req)
        if params.max_new_tokens is not None and len(ids) + params.max_new_tokens > self.context_len:
            raise ValueError(
                f"max_new_tokens: the prompt has {len(ids)} tokens and {params.max_new_tokens} more were "
                f"requested, beyond the context length of {self.context_len} tokens")
        return ids, params

    @staticmethod
    def prompt_logprob_start(req: GenerateRequest, prompt_len: int) -> int:
        """The first prompt position to return a logprob for, -1 for none (SGLang's rules: -1
        asks for the last prompt token's; the start must lie inside the prompt)."""
        start = req.logprob_start_len
        if not req.return_logprob or start is None:
            return -1
        if not isinstance(start, int) or isinstance(start, bool) or start < -1:
            raise ValueError(f"logprob_start_len must be an integer >= -1, got {start!r}")
        if start >= prompt_len:
            raise ValueError(f"logprob_start_len ({start}) is not less than the number of prompt tokens "
                             f"({prompt_len}); use a smaller logprob_start_len")
        return prompt_len - 1 if start == -1 else start

    def check_constraint(self, params: SamplingParams) -> None:
        """A json_schema / regex / ebnf that cannot compile is a ValueError here, before the
        request is sent. Only the syntax is checked (cheap, cached, tokenizer-free); the
        scheduler compiles against the vocabulary off its loop, and reports a late failure
        as an abort with status 400, which generate() raises as ValueError too."""
        key = grammar_key(params)
        if key is None:
            return
        backend = self.server_args.grammar_backend
        if backend == "none":
            raise ValueError(f"{key.kind} needs constrained decoding, but the server was started with "
                             "--grammar-backend none")
        error = _constraint_error(backend, key)
        if error:
            raise ValueError(error)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        if not self.is_alive():
            raise RuntimeError(f"the scheduler is not running: {self.dead_reason or 'stopped'}")
        ids, params = self.validate(req)
        start = self.prompt_logprob_start(req, len(ids))
        rid = req.rid or self.new_rid()
        if rid in self._states:
            raise ValueError(f"rid {rid!r} is already in use")
        state = _ReqState(
            rid=rid, params=params, prompt_len=len(ids),
            detok=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens,
                                         spaces_between_special_tokens=params.spaces_between_special_tokens),
            stop=StopStringMatcher(params.stop, no_stop_trim=params.no_stop_trim), want_logprobs=req.return_logprob,
            created=time.monotonic(), prompt_ids=ids, logprob_start_len=start)
        self._states[rid] = state
        self.client.send(TokenizedGenerateReq(rid, ids, params, return_logprob=req.return_logprob,
                                              top_logprobs_num=req.top_logprobs_num, logprob_start_len=start,
                                              stream=req.stream, arrival_time=time.monotonic()))
        if self.server_args.log_requests:
            logger.info("request %s: %d prompt tokens, params %s", rid, len(ids), params)
        finished = False
        try:
            sent_text_len = -1
            while True:
                await state.event.wait()
                state.event.clear()
                if self.dead_reason is not None and state.finish is None:
                    raise RuntimeError(f"the scheduler stopped: {self.dead_reason}")
                finished = state.finish is not None
                if finished and state.finish.get("type") == "abort" and state.finish.get("status_code") == 400:
                    raise ValueError(state.finish.get("message") or "the request was rejected")
                if finished or (req.stream and len(state.text) != sent_text_len):
                    sent_text_len = len(state.text)
                    if finished or req.stream:
                        yield self._result(state, req.return_text_in_logprobs)
                if finished:
                    return
        finally:
            self._states.pop(rid, None)
            if not finished:  # the caller went away (or failed): stop the work, count the abort
                self.abort_request(rid)
                self._observe(state, 0, time.monotonic(),
                              {"type": "abort", "message": "the client went away"})

    def _result(self, s: _ReqState, logprob_text: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": s.rid, "prompt_tokens": s.prompt_len, "completion_tokens": len(s.output_ids),
            "cached_tokens": s.cached_tokens, "finish_reason": s.finish,
            "e2e_latency": time.monotonic() - s.created,
        }
        if s.want_logprobs:
            meta["output_token_logprobs"] = [self._lp(lp, t, logprob_text) for lp, t in s.logprobs]
            meta["output_top_logprobs"] = [[self._lp(lp, t, logprob_text) for lp, t in row]
                                           for row in s.top_logprobs]
        if s.logprob_start_len >= 0:
            prompt = s.prompt_ids[s.logprob_start_len:]
            meta["input_token_logprobs"] = [self._lp(lp, t, logprob_text)
                                            for lp, t in zip(s.input_logprobs, prompt)]
            meta["input_top_logprobs"] = [None if row is None else
                                          [self._lp(lp, t, logprob_text) for lp, t in row]
                                          for row in s.input_top_logprobs]
        return {"text": s.text, "output_ids": list(s.output_ids), "meta_info": meta}

    def _lp(self, lp: float, tok: int, with_text: bool) -> list[Any]:
        return [lp, tok, self.tokenizer.decode([tok]) if with_text else None]

    def abort_request(self, rid: str) -> None:
        if self.client.is_alive():
            self.client.send(AbortReq(rid=rid))

    def abort_all(self) -> list[str]:
        """Abort every request of this front end (HTTP and gRPC alike); returns their ids."""
        rids = sorted(self._states)
        if self.client.is_alive():
            self.client.send(AbortReq(abort_all=True))
        return rids

    async def flush_cache(self) -> bool:
        out: FlushCacheOutput = await self._ask(FlushCacheReq(), FlushCacheOutput)
        return out.success

    async def get_stats(self) -> SchedulerStats:
        return await self._ask(GetStatsReq(), SchedulerStats)

    async def _ask(self, msg: Any, reply_type: type) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._pending_replies.setdefault(reply_type, []).append(fut)
        self.client.send(msg)
        return await fut

    def apply_chat_template(self, messages: list[dict], tools: Optional[list[dict]] = None,
                            add_generation_prompt: bool = True,
                            template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, tools, add_generation_prompt, **(template_kwargs or {}))

    # -- outputs -------------------------------------------------------------------------------
    def _handle_output(self, obj: Any) -> None:
        if isinstance(obj, BatchTokenOutput):
            self._handle_tokens(obj)
        elif isinstance(obj, SchedulerError):
            self._mark_dead(obj.message)
        elif type(obj) in self._pending_replies and self._pending_replies[type(obj)]:
            fut = self._pending_replies[type(obj)].pop(0)
            if not fut.done():
                fut.set_result(obj)
        else:
            logger.warning("unexpected message from the scheduler: %r", type(obj).__name__)

    def _mark_dead(self, reason: str) -> None:
        logger.error("scheduler failed: %s", reason)
        self.dead_reason = reason
        for s in self._states.values():
            s.event.set()
        for futs in self._pending_replies.values():
            for f in futs:
                if not f.done():
                    f.set_exception(RuntimeError(f"the scheduler stopped: {reason}"))

    def _handle_tokens(self, out: BatchTokenOutput) -> None:
        now = time.monotonic()
        for i, rid in enumerate(out.rids):
            s = self._states.get(rid)
            if s is None:
                continue
            new = out.new_token_ids[i]
            finish = out.finished_reasons[i]
            s.output_ids.extend(new)
            s.cached_tokens = out.cached_tokens[i]
            if s.want_logprobs and out.output_token_logprobs:
                s.logprobs.extend(zip(out.output_token_logprobs[i], new))
                s.top_logprobs.extend(out.output_top_logprobs[i])
            if s.logprob_start_len >= 0 and out.input_token_logprobs:
                s.input_logprobs.extend(out.input_token_logprobs[i])
                s.input_top_logprobs.extend(out.input_top_logprobs[i])
            text_ids = new
            if finish and finish.get("type") == "stop" and isinstance(finish.get("matched"), int) \
                    and not s.params.no_stop_trim and new and new[-1] == finish["matched"]:
                text_ids = new[:-1]  # the stop token itself is not text
            s.raw_text += s.detok.append(text_ids)
            if finish is not None:
                s.raw_text += s.detok.flush()
                s.text = s.stop.finalize(s.raw_text)
                s.finish = finish
            else:
                s.text, _ = s.stop.process(s.raw_text)
            self._observe(s, len(new), now, finish)
            s.event.set()

    def _observe(self, s: _ReqState, n_new: int, now: float, finish: Optional[dict]) -> None:
        if self.metrics is not None and n_new:
            if s.first_token_time is None:
                self.metrics.on_first_token(now - s.created)
                if n_new > 1:
                    self.metrics.on_tokens((now - s.created) / n_new, n_new - 1)
            else:
                self.metrics.on_tokens((now - s.last_token_time) / n_new, n_new)
        if n_new:
            s.first_token_time = s.first_token_time or now
            s.last_token_time = now
        if finish is not None:
            if self.metrics is not None:
                self.metrics.on_finish(now - s.created, s.prompt_len, len(s.output_ids), s.cached_tokens,
                                       finish.get("type") == "abort")
            if self.server_args.log_requests:
                logger.info("request %s finished: %s, %d prompt (%d cached), %d completion tokens, %.3fs",
                            s.rid, finish, s.prompt_len, s.cached_tokens, len(s.output_ids),
                            now - s.created)


@functools.lru_cache(maxsize=1024)
def _constraint_error(backend: str, key: GrammarKey) -> Optional[str]:
    try:
        backend_class(backend).validate(key)
    except GrammarError as e:
        return str(e)
    return None
