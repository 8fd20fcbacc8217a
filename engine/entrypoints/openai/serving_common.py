"""What chat, completions and /generate share: parsing a body into a protocol model,
expanding prompts x n into GenerateRequests, running them, and reading results back
(finish reasons, aborts, usage)."""
from __future__ import annotations

import json
import logging
from typing import Any, Optional, TypeVar

import pydantic
from starlette.requests import Request

from engine.entrypoints.openai.errors import APIError, from_validation_error, from_value_error
from engine.entrypoints.openai.protocol import PromptItem, PromptTokensDetails, UsageInfo
from engine.entrypoints.fanout import ClientDisconnected, FanOut
from engine.entrypoints.openai.streaming import SSE_DONE, sse, wait_disconnect
from engine.io_struct import GenerateRequest
from engine.sampling.sampling_params import is_unicode_text

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=pydantic.BaseModel)
LOGPROB_FLOOR = -9999.0     # JSON has no -inf


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        obj = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as e:      # JSONDecodeError, bad UTF-8, deep nesting
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            "Content-Type: application/json", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{'nothing' if obj is None else type(obj).__name__}", code="invalid_json")
    if not is_unicode_text(json.dumps(obj, ensure_ascii=False)):     # JSON allows "\ud800" escapes
        raise APIError(400, "the request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                            "without its pair), which is not Unicode text", code="invalid_json")
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as e:
        raise from_validation_error(e) from None


def sample_requests(prompts: list[PromptItem], n: int, base_sp: dict[str, Any], rid: str,
                    stream: bool, return_logprob: bool = False, top_logprobs_num: int = 0,
                    logprob_start_len: Optional[int] = None) -> list[GenerateRequest]:
    """One GenerateRequest per (prompt i, sample j), index i * n + j. Sample j uses seed + j
    (so the same prompt gives the same samples in a batch as alone); rids are unique."""
    reqs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            sp = dict(base_sp)
            if sp.get("seed") is not None:
                sp["seed"] += j
            k = i * n + j
            reqs.append(GenerateRequest(
                text=prompt if isinstance(prompt, str) else None,
                input_ids=prompt if isinstance(prompt, list) else None,
                sampling_params=sp, rid=rid if len(prompts) * n == 1 else f"{rid}-{k}",
                stream=stream, return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
                logprob_start_len=logprob_start_len))
    return reqs


async def start(fan: FanOut, request: Request) -> None:
    """Start the generations; a ValueError from the TokenizerManager (prompt too long, token
    id out of the vocabulary, ...) becomes a 400 before any response is sent."""
    try:
        await fan.start(lambda: wait_disconnect(request))
    except Exception as e:  # noqa: BLE001 - sorted into 400 / 503 / re-raised
        raise as_api_error(fan.tm, e) from None


async def finals(fan: FanOut, request: Request) -> list[dict]:
    try:
        return await fan.finals(lambda: wait_disconnect(request))
    except Exception as e:  # noqa: BLE001 - sorted into 400 / 503 / re-raised
        raise as_api_error(fan.tm, e) from None


def as_api_error(tm: Any, e: Exception) -> Exception:
    """ValueError → 400; anything while the scheduler is gone → 503; else unchanged (500)."""
    if isinstance(e, (APIError, ClientDisconnected)):
        return e
    if isinstance(e, ValueError):
        return from_value_error(e)
    if not tm.is_alive():
        return APIError(503, f"the scheduler stopped while serving this request ({e})",
                        code="scheduler_dead")
    return e


def stream_error(fan: FanOut, e: Exception, what: str) -> bytes:
    """The last events of a stream that failed after it started: an error event, [DONE].
    Call inside the `except` block (unexpected errors are logged with their traceback)."""
    err = as_api_error(fan.tm, e)
    if not isinstance(err, APIError):
        logger.exception("%s failed while streaming", what)
        err = APIError(500, f"internal error while streaming: {type(e).__name__}: {e}",
                       code="internal_error")
    return sse(err.body()) + SSE_DONE


def finish_reason(meta: dict) -> Optional[str]:
    fr = meta.get("finish_reason")
    if not fr:
        return None
    return fr.get("type", "stop") if isinstance(fr, dict) else str(fr)


def new_text(sent: list[str], i: int, text: str) -> str:
    """The part of choice i's cumulative ``text`` not sent yet (all of it if it was rewritten)."""
    delta = text[len(sent[i]):] if text.startswith(sent[i]) else text
    sent[i] = text
    return delta


def abort_events(meta: dict) -> Optional[list[bytes]]:
    """The closing events of a stream whose request was aborted, or None."""
    err = abort_error(meta)
    return None if err is None else [sse(err.body()), SSE_DONE]


def abort_error(meta: dict) -> Optional[APIError]:
    """An aborted generation as an error (503 unless the TokenizerManager gave a status:
    the request did not fail because of its input)."""
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") != "abort":
        return None
    status = fr.get("status_code") or 503
    return APIError(int(status), f"the request was aborted: {fr.get('message') or 'no reason given'}",
                    code="request_aborted")


def usage(metas: list[Optional[dict]], n: int) -> UsageInfo:
    """Prompt tokens count once per prompt (not per sample); cached tokens are the best any
    sample of that prompt got; completion tokens add up over all samples."""
    prompt = cached = completion = 0
    for i in range(0, len(metas), n):
        group = [m for m in metas[i:i + n] if m]
        if group:
            prompt += group[0].get("prompt_tokens", 0)
            cached += max(m.get("cached_tokens", 0) for m in group)
        completion += sum(m.get("completion_tokens", 0) for m in group)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def logprob_entries(meta: dict, start: int) -> tuple[list, list]:
    """New (logprob, token_id, text) entries from position `start`, and their top lists."""
    toks = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    new_toks = toks[start:]
    new_tops = [tops[k] if k < len(tops) and tops[k] else [] for k in range(start, len(toks))]
    return new_toks, new_tops


def clamp(lp: Optional[float]) -> float:
    return LOGPROB_FLOOR if lp is None or lp != lp or lp < LOGPROB_FLOOR else float(lp)
