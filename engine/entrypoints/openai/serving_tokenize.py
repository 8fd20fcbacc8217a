"""POST /v1/tokenize and /v1/detokenize (SGLang's names; /tokenize and /detokenize, vLLM's, are
the same routes): the server's own tokenizer, for clients that count tokens or build prompts
of ids. Nothing reaches the scheduler.

Tokenize answers ``tokens`` and ``count`` (lists of them for a list of prompts),
``max_model_len`` and, when asked, ``token_strs`` (each id's piece of text). Chat messages are
rendered by the chat template exactly as /v1/chat/completions renders them, so ``count`` is
that request's ``usage.prompt_tokens``. Detokenize answers ``text`` (and ``prompt``, vLLM's
name for it)."""
from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request

from engine.entrypoints.openai import serving_common as common
from engine.entrypoints.openai.context import ApiContext
from engine.entrypoints.openai.errors import APIError, from_value_error
from engine.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest


async def create_tokenize(ctx: ApiContext, request: Request) -> dict[str, Any]:
    req = await common.parse_body(request, TokenizeRequest)
    if req.model is not None:     # optional here, as in vLLM
        ctx.check_model(req.model)
    tm, tok = ctx.tm, ctx.tm.tokenizer
    single = req.messages is not None or isinstance(req.prompt, str)
    if req.messages is not None:
        try:
            seqs = [tm.apply_chat_template([m.to_template_dict() for m in req.messages], req.tools,
                                           add_generation_prompt=req.add_generation_prompt,
                                           template_kwargs=req.chat_template_kwargs)]
        except ValueError as e:
            raise from_value_error(e) from None
        except TemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    else:
        prompts = [req.prompt] if single else req.prompt
        seqs = [tok.encode(p, add_special_tokens=req.add_special_tokens) for p in prompts]
    out: dict[str, Any] = {"tokens": seqs, "count": [len(s) for s in seqs], "max_model_len": tm.context_len}
    if req.return_token_strs:
        out["token_strs"] = [tok.convert_ids_to_tokens(s) for s in seqs]
    if single:      # one prompt: one list, one count
        out.update({k: v[0] for k, v in out.items() if k != "max_model_len"})
    return out


async def create_detokenize(ctx: ApiContext, request: Request) -> dict[str, Any]:
    req = await common.parse_body(request, DetokenizeRequest)
    if req.model is not None:
        ctx.check_model(req.model)
    nested = bool(req.tokens) and isinstance(req.tokens[0], list)
    seqs: list[list[int]] = req.tokens if nested else [req.tokens]   # type: ignore[list-item]
    vocab = ctx.tm.vocab_size
    for i, seq in enumerate(seqs):
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            where = f"tokens[{i}]" if nested else "tokens"
            raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="tokens")
    texts = [ctx.tm.tokenizer.decode(seq, skip_special_tokens=req.skip_special_tokens) for seq in seqs]
    text: Any = texts if nested else texts[0]
    return {"text": text, "prompt": text}
