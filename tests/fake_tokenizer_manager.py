"""A TokenizerManager stand-in for front-end tests: no model, no scheduler.

Tokens are characters (id = code point). A sample's reply is REPLY rotated by its seed;
it ends with EOS ("stop") after len(REPLY) tokens unless ignore_eos, or at max_new_tokens
("length"), or at a stop string / stop token. Honours stream, logprobs and abort, and
records every abort (by abort_request, or because the consumer stopped iterating).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from engine.entrypoints.tokenizer_manager import TokenizerManager
from engine.io_struct import GenerateRequest, SchedulerInfo, SchedulerStats
from engine.sampling.sampling_params import SamplingParams
from engine.server_args import ServerArgs

REPLY = "The quick brown fox jumps over the lazy dog."
CRASH_MARKER = "__crash__"      # a prompt containing it makes generate raise RuntimeError
EOS_ID = 2


class FakeTokenizer:
    eos_token_id = EOS_ID
    bos_token_id = 1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if ord(c) < self.vocab_size else ord("?") for c in text]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 32 and i not in (9, 10)))


@dataclass
class FakeTokenizerManager:
    served_model_name: str = "fake-model"
    model_path: str = "/models/fake-model"
    context_len: int = 256
    vocab_size: int = 1000
    token_delay: float = 0.0           # seconds per generated token
    alive: bool = True
    server_args: Optional[ServerArgs] = None
    metrics: Any = None
    aborts: list[tuple[str, str]] = field(default_factory=list)   # (rid, "abort_request" | "consumer_gone")
    requests: list[GenerateRequest] = field(default_factory=list)
    last_chat: Optional[tuple[list[dict], Optional[list[dict]]]] = None
    last_template_kwargs: Optional[dict[str, Any]] = None
    running: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.server_args is None:
            self.server_args = ServerArgs(model_path=self.model_path,
                                          served_model_name=self.served_model_name, device="cpu")
        self.tokenizer = FakeTokenizer(self.vocab_size)
        self.scheduler_info = SchedulerInfo(
            max_total_tokens=4096, max_running_requests=16, context_length=self.context_len,
            vocab_size=self.vocab_size, device="cpu", dtype="float32", attention_backend="fake",
            sampling_backend="fake")
        self._abort_flags: set[str] = set()
        self._seen_prompts: list[list[int]] = []

    # ---- the contract -----------------------------------------------------------------------
    def new_rid(self) -> str:
        return uuid.uuid4().hex

    def is_alive(self) -> bool:
        return self.alive

    def abort_request(self, rid: str) -> None:
        if rid in self.running:
            self._abort_flags.add(rid)

    def abort_all(self) -> list[str]:
        rids = sorted(self.running)
        for rid in rids:
            self.abort_request(rid)
        return rids

    async def flush_cache(self) -> bool:
        if self.running:
            return False
        self._seen_prompts.clear()
        return True

    async def get_stats(self) -> SchedulerStats:
        return SchedulerStats(num_running_reqs=len(self.running), num_queue_reqs=0,
                              token_usage=0.25, cache_hit_rate=0.5, max_total_tokens=4096,
                              available_tokens=3072, evictable_tokens=100)

    def apply_chat_template(self, messages: list[dict], tools: Optional[list[dict]] = None,
                            add_generation_prompt: bool = True,
                            template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
        """A Qwen3-like template: enable_thinking false prefills an empty think block."""
        if not messages:
            raise ValueError("messages must not be empty")
        self.last_chat = (messages, tools)
        self.last_template_kwargs = template_kwargs
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
            if not (template_kwargs or {}).get("enable_thinking", True):
                text += "<think>\n\n</think>\n\n"
        return self.tokenizer.encode(text)

    def _check(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        if (req.text is None) == (req.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        ids = self.tokenizer.encode(req.text) if req.text is not None else list(req.input_ids)
        if not ids:
            raise ValueError("prompt is empty; send at least one token")
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"input_ids: token id {t} is outside the vocabulary (size {self.vocab_size})")
        sp = SamplingParams.from_dict(req.sampling_params)
        sp.check_vocab(self.vocab_size)
        TokenizerManager.prompt_logprob_start(req, len(ids))      # the real range rules
        if sp.n != 1:
            raise ValueError(f"n must be 1 per generate call, got {sp.n}")
        if len(ids) >= self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the context length "
                             f"({self.context_len}) allows")
        if sp.max_new_tokens is None:
            sp.max_new_tokens = self.context_len - len(ids)
        if len(ids) + sp.max_new_tokens > self.context_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({sp.max_new_tokens}) "
                             f"exceeds the context length ({self.context_len})")
        if CRASH_MARKER in self.tokenizer.decode(ids):
            raise RuntimeError("fake crash requested by the prompt")
        return ids, sp

    def _cached(self, ids: list[int]) -> int:
        best = 0
        for seen in self._seen_prompts:
            k = 0
            while k < min(len(seen), len(ids) - 1) and seen[k] == ids[k]:
                k += 1
            best = max(best, k)
        self._seen_prompts.append(ids)
        return best

    async def generate(self, req: GenerateRequest) -> AsyncIterator[dict]:
        ids, sp = self._check(req)
        self.requests.append(req)
        rid = req.rid or self.new_rid()
        self.running.add(rid)
        start = time.monotonic()
        cached = self._cached(ids)
        out_ids: list[int] = []
        text = ""
        finish: Optional[dict] = None
        shift = (sp.seed or 0) % len(REPLY)
        reply = REPLY[shift:] + REPLY[:shift]
        logprobs: list[list] = []
        tops: list[list] = []
        try:
            while finish is None:
                if rid in self._abort_flags:
                    finish = {"type": "abort", "message": "aborted by /abort_request"}
                    self.aborts.append((rid, "abort_request"))
                    break
                k = len(out_ids)
                if k >= sp.max_new_tokens:
                    finish = {"type": "length", "length": k}
                    break
                await asyncio.sleep(self.token_delay)
                if k >= len(reply) and not sp.ignore_eos:
                    finish = {"type": "stop", "matched": EOS_ID}
                    break
                tok = ord(reply[k % len(reply)])
                out_ids.append(tok)
                if req.return_logprob:
                    logprobs.append([-0.5 - 0.01 * k, tok, chr(tok)])
                    tops.append([[-0.5 - 0.01 * k - j, tok + j, chr(tok + j)]
                                 for j in range(req.top_logprobs_num)])
                if self.metrics is not None:
                    if k == 0:
                        self.metrics.on_first_token(time.monotonic() - start)
                    else:
                        self.metrics.on_tokens(self.token_delay, 1)
                if tok in sp.stop_token_ids:
                    finish = {"type": "stop", "matched": tok}
                text = "".join(chr(t) for t in out_ids if t not in sp.stop_token_ids)
                hit = next((s for s in sp.stop if s in text), None)
                if hit is not None:
                    text = text[:text.index(hit)]
                    finish = {"type": "stop", "matched": hit}
                elif any(text.endswith(s[:j]) for s in sp.stop for j in range(1, len(s))):
                    continue        # may be the start of a stop string: hold it back
                if req.stream and finish is None:
                    yield self._out(rid, ids, out_ids, text, cached, None, logprobs, tops, start, req)
            yield self._out(rid, ids, out_ids, text, cached, finish, logprobs, tops, start, req)
            if self.metrics is not None:
                self.metrics.on_finish(time.monotonic() - start, len(ids), len(out_ids), cached,
                                       finish["type"] == "abort")
        finally:
            if finish is None:      # the consumer stopped iterating before the end
                self.aborts.append((rid, "consumer_gone"))
            self.running.discard(rid)
            self._abort_flags.discard(rid)

    def _out(self, rid: str, ids: list[int], out_ids: list[int], text: str, cached: int,
             finish: Optional[dict], logprobs: list, tops: list, start: float,
             req: GenerateRequest) -> dict:
        meta: dict[str, Any] = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": len(out_ids),
                                "cached_tokens": cached, "finish_reason": finish,
                                "e2e_latency": time.monotonic() - start}
        if req.return_logprob:
            meta["output_token_logprobs"] = [list(x) for x in logprobs]
            meta["output_top_logprobs"] = [[list(y) for y in x] for x in tops]
        if req.return_logprob and req.logprob_start_len is not None:
            meta["input_token_logprobs"], meta["input_top_logprobs"] = _prompt_logprobs(ids, req)
        return {"text": text, "output_ids": list(out_ids), "meta_info": meta}

    def consumer_gone(self) -> list[str]:
        return [rid for rid, how in self.aborts if how == "consumer_gone"]


def prompt_logprob(pos: int) -> float:
    """The fake logprob of the prompt token at position pos (> 0)."""
    return -1.0 - 0.1 * pos


def _prompt_logprobs(ids: list[int], req: GenerateRequest) -> tuple[list, list]:
    """SGLang's input_token_logprobs and input_top_logprobs from logprob_start_len (-1: the last
    prompt token); the first prompt token has none."""
    start = len(ids) - 1 if req.logprob_start_len == -1 else req.logprob_start_len
    if not 0 <= start < len(ids):
        raise ValueError(f"logprob_start_len ({start}) is not less than the number of prompt tokens")
    toks, tops = [], []
    for pos in range(start, len(ids)):
        lp = None if pos == 0 else prompt_logprob(pos)
        toks.append([lp, ids[pos], chr(ids[pos])])
        tops.append(None if pos == 0 else [[lp - j, ids[pos] + j, chr(ids[pos] + j)]
                                           for j in range(req.top_logprobs_num)])
    return toks, tops
