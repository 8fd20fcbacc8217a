"""SGLang's native HTTP API: /generate, /health, /health_generate, /get_model_info,
/get_server_info, /flush_cache, /abort_request (compatible with SGLang's clients)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.entrypoints.openai import serving_common as common
from engine.entrypoints.openai.context import ApiContext, anyserve_version
from engine.entrypoints.openai.errors import APIError
from engine.entrypoints.openai.protocol import GenerateReqInput
from engine.entrypoints.fanout import FanOut
from engine.entrypoints.openai.streaming import SSE_DONE, SSEResponse, sse
from engine.io_struct import GenerateRequest

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 30.0
_SECRET_ARGS = ("api_key",)


class AbortRequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    rid: Optional[str] = None
    abort_all: bool = False


def build_native_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    tm = ctx.tm

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        ctx.ensure_alive()
        req = await common.parse_body(request, GenerateReqInput)
        reqs = [GenerateRequest(text=p if isinstance(p, str) else None,
                                input_ids=p if isinstance(p, list) else None,
                                sampling_params=sp, rid=rid or tm.new_rid(), stream=req.stream,
                                return_logprob=lp, top_logprobs_num=top, logprob_start_len=start,
                                return_text_in_logprobs=req.return_text_in_logprobs)
                for p, sp, rid, lp, top, start in req.expand()]
        fan = FanOut(tm, reqs, ctx.inflight)
        await common.start(fan, request)
        as_list = req.is_batch or len(reqs) > 1
        if req.stream:
            return SSEResponse(_stream(fan, as_list))
        outs = [_finite_logprobs(o) for o in await common.finals(fan, request)]
        return JSONResponse(outs if as_list else outs[0])

    @router.get("/health")
    async def health() -> Response:
        if not tm.is_alive():
            return APIError(503, "the scheduler is not running", code="scheduler_dead").response()
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate() -> Response:
        ctx.ensure_alive()
        req = GenerateRequest(input_ids=[_probe_token(tm)], rid=f"health-{tm.new_rid()}",
                              sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        fan = FanOut(tm, [req], ctx.inflight)
        try:
            outs = await asyncio.wait_for(fan.finals(), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"no token generated within {HEALTH_GENERATE_TIMEOUT_S:.0f} s; "
                                "the scheduler may be stuck or overloaded") from None
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            raise APIError(503, f"health generation failed: {type(e).__name__}: {e}") from None
        err = common.abort_error(outs[0]["meta_info"])
        if err is not None:
            raise APIError(503, f"health generation was aborted: {err.message}")
        return Response(status_code=200)

    @router.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        args = ctx.server_args
        return {"model_path": tm.model_path,
                "tokenizer_path": getattr(args, "tokenizer_path", None) or tm.model_path,
                "is_generation": True, "served_model_name": tm.served_model_name}

    @router.get("/get_server_info")
    async def get_server_info() -> dict[str, Any]:
        args = dataclasses.asdict(ctx.server_args) if dataclasses.is_dataclass(ctx.server_args) \
            else dict(vars(ctx.server_args))
        for key in _SECRET_ARGS:
            if args.get(key):
                args[key] = "<set>"
        info = getattr(tm, "scheduler_info", None)
        out = {**args, "scheduler_info": dataclasses.asdict(info) if info is not None else None,
               "context_length": tm.context_len, "vocab_size": tm.vocab_size,
               "version": anyserve_version()}
        if args.get("speculative_algorithm"):
            # as SGLang: the mean accept length (tokens per request and decode step) since the start
            spec = (await tm.get_stats()).spec
            out["internal_states"] = [{
                "avg_spec_accept_length": spec.accept_length if spec is not None else None,
                "spec_draft_tokens": spec.draft_tokens if spec is not None else 0,
                "spec_accepted_tokens": spec.accepted_tokens if spec is not None else 0}]
        return out

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ctx.ensure_alive()
        if not await tm.flush_cache():
            raise APIError(400, "cache not flushed: requests are running or waiting; retry when "
                                "the server is idle", code="requests_running")
        return JSONResponse({"success": True, "message": "Cache flushed."})

    @router.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        req = await common.parse_body(request, AbortRequestInput)
        if req.abort_all:
            return JSONResponse({"success": True, "aborted": tm.abort_all()})
        if req.rid:
            # A rid given to /generate with n > 1 became rid-0, rid-1, ...
            rids = [req.rid] + sorted(r for r in ctx.inflight if r.startswith(f"{req.rid}-"))
        else:
            raise APIError(400, "give 'rid' (the request to abort) or 'abort_all': true", param="rid")
        for rid in rids:
            tm.abort_request(rid)
        return JSONResponse({"success": True, "aborted": rids})

    return router


def _finite_logprobs(out: dict) -> dict:
    """JSON has no inf/NaN: such logprobs (masked tokens in a top list) become null."""
    meta = out.get("meta_info") or {}
    if "output_token_logprobs" not in meta and "input_token_logprobs" not in meta:
        return out

    def fix(entry: list) -> list:
        lp = entry[0]
        return [lp if isinstance(lp, (int, float)) and math.isfinite(lp) else None, *entry[1:]]

    meta = dict(meta)
    for kind in ("output", "input"):
        if f"{kind}_token_logprobs" in meta:
            meta[f"{kind}_token_logprobs"] = [fix(e) for e in meta[f"{kind}_token_logprobs"]]
            meta[f"{kind}_top_logprobs"] = [None if row is None else [fix(e) for e in row]
                                            for row in meta.get(f"{kind}_top_logprobs") or []]
    return {**out, "meta_info": meta}


def _probe_token(tm: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        t = getattr(tm.tokenizer, name, None)
        if isinstance(t, int) and 0 <= t < tm.vocab_size:
            return t
    return 0


async def _stream(fan: FanOut, with_index: bool) -> AsyncIterator[bytes]:
    """SGLang's streaming: cumulative dicts (text so far), `index` when several outputs."""
    try:
        async for i, out in fan.updates():
            out = _finite_logprobs(out)
            yield sse({**out, "index": i} if with_index else out)
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield common.stream_error(fan, e, "/generate")
    finally:
        fan.close()
