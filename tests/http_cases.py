"""HTTP API checks reusable against any server: an httpx.Client whose base_url is the
server (FastAPI's TestClient over the fake, or a real `anyserve serve` process).

    with httpx.Client(base_url="http://127.0.0.1:30000", timeout=60) as c:
        run_bad_inputs(c, "my-model"); run_field_checks(c, "my-model")

The checks assume nothing about the generated text, only about shapes and bookkeeping.
Error substrings for TokenizerManager errors: a prompt that does not fit must mention
"context", a token id outside the vocabulary "vocab".
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional, Union

import httpx

MODEL = "{{model}}"        # replaced by the served model name
CHAT = "POST /v1/chat/completions"
CMPL = "POST /v1/completions"
GEN = "POST /generate"
TOK = "POST /v1/tokenize"
DETOK = "POST /v1/detokenize"


class BadInput(NamedTuple):
    route: str                              # "METHOD /path"
    body: Union[dict, str, list, None]      # a str is sent as raw bytes (malformed JSON)
    status: int
    substring: str                          # must appear in error.message (any case)


def _chat(**kw: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


def _cmpl(**kw: Any) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **kw}


_USER = [{"role": "user", "content": "Hi"}]
BAD_INPUTS: list[BadInput] = [
    BadInput(CHAT, {"model": MODEL}, 400, "messages"),
    BadInput(CHAT, _chat(messages=[]), 400, "messages"),
    BadInput(CHAT, _chat(messages="hi"), 400, "messages"),
    BadInput(CHAT, _chat(messages=[{"role": "robot", "content": "x"}]), 400, "robot"),
    BadInput(CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "image_url"),
    BadInput(CHAT, _chat(messages=[{"role": "user"}]), 400, "content"),
    BadInput(CHAT, {"messages": _USER}, 400, "model"),
    BadInput(CHAT, _chat(model="no-such-model"), 404, "no-such-model"),
    BadInput(CHAT, _chat(temperature=-1), 400, "temperature"),
    BadInput(CHAT, _chat(temperature="hot"), 400, "temperature"),
    BadInput(CHAT, _chat(top_p=0), 400, "top_p"),
    BadInput(CHAT, _chat(top_p=1.5), 400, "top_p"),
    BadInput(CHAT, _chat(top_k=-5), 400, "top_k"),
    BadInput(CHAT, _chat(min_p=2), 400, "min_p"),
    BadInput(CHAT, _chat(max_tokens=-5), 400, "max_tokens"),
    BadInput(CHAT, _chat(max_tokens=1.5), 400, "max_tokens"),
    BadInput(CHAT, _chat(max_tokens=10**9), 400, "context"),
    BadInput(CHAT, _chat(n=0), 400, "n"),
    BadInput(CHAT, _chat(n=1000), 400, "n"),
    BadInput(CHAT, _chat(stop=5), 400, "stop"),
    BadInput(CHAT, _chat(stop=[""]), 400, "stop"),
    BadInput(CHAT, _chat(presence_penalty=3), 400, "presence_penalty"),
    BadInput(CHAT, _chat(frequency_penalty=-3), 400, "frequency_penalty"),
    BadInput(CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty"),
    BadInput(CHAT, _chat(logprobs="yes"), 400, "logprobs"),
    BadInput(CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    BadInput(CHAT, _chat(top_logprobs=2), 400, "top_logprobs"),
    BadInput(CHAT, _chat(logit_bias={"x": 1}), 400, "logit_bias"),
    BadInput(CHAT, _chat(logit_bias={"5": 500}), 400, "logit_bias"),
    BadInput(CHAT, _chat(response_format={"type": "xml"}), 400, "response_format"),
    BadInput(CHAT, _chat(response_format={"type": "json_schema"}), 400, "json_schema"),
    BadInput(CHAT, _chat(seed="abc"), 400, "seed"),
    BadInput(CHAT, _chat(max_tokens=2, min_tokens=10), 400, "min_tokens"),
    BadInput(CHAT, _chat(stream="yes"), 400, "stream"),
    BadInput(CHAT, _chat(stream=True, stream_options={"include_usage": "yes"}), 400, "include_usage"),
    BadInput(CHAT, "{not json", 400, "JSON"),
    BadInput(CHAT, [1, 2], 400, "object"),
    BadInput("GET /v1/chat/completions", None, 405, "method"),
    BadInput(CMPL, {"model": MODEL}, 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=""), 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=[]), 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=[[1, 2], "x"]), 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=[-1]), 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=[1, "a"]), 400, "prompt"),
    BadInput(CMPL, _cmpl(prompt=[10**9]), 400, "vocab"),
    BadInput(CMPL, _cmpl(prompt=[1] * 200_000), 400, "context"),
    BadInput(CMPL, _cmpl(logprobs=6), 400, "logprobs"),
    BadInput(CMPL, _cmpl(suffix="x"), 400, "suffix"),
    BadInput(CMPL, _cmpl(best_of=3), 400, "best_of"),
    BadInput(CMPL, _cmpl(echo="yes"), 400, "echo"),
    BadInput(CMPL, _cmpl(model="no-such-model"), 404, "no-such-model"),
    BadInput(GEN, {}, 400, "text"),
    BadInput(GEN, {"text": "hi", "input_ids": [1]}, 400, "text"),
    BadInput(GEN, {"text": ""}, 400, "text"),
    BadInput(GEN, {"text": "hi", "sampling_params": {"temperature": -1}}, 400, "temperature"),
    BadInput(GEN, {"text": "hi", "sampling_params": {"bogus": 1}}, 400, "bogus"),
    BadInput(GEN, {"text": ["a", "b"], "sampling_params": [{}, {}, {}]}, 400, "sampling_params"),
    BadInput(GEN, {"text": "hi", "sampling_params": {"n": 0}}, 400, "n"),
    BadInput(GEN, {"input_ids": [10**9]}, 400, "vocab"),
    BadInput(GEN, {"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 3}, 400,
             "logprob_start_len"),
    BadInput(GEN, {"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": -2}, 400,
             "logprob_start_len"),
    BadInput("POST /abort_request", {}, 400, "rid"),
    # JSON escapes of lone UTF-16 surrogates: not text (a stop string like this once stopped the scheduler)
    BadInput(CMPL, '{"model": "m", "prompt": "Hi", "max_tokens": 2, "stop": ["\\ud800"]}', 400, "surrogate"),
    BadInput(CHAT, '{"model": "m", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400, "surrogate"),
    BadInput(GEN, '{"text": "\\ud800 x"}', 400, "surrogate"),
    BadInput("GET /v1/models/no-such-model", None, 404, "no-such-model"),
    BadInput("GET /no/such/route", None, 404, "route"),
    BadInput(TOK, {"model": MODEL}, 400, "exactly one of prompt"),
    BadInput(TOK, {"prompt": "hi", "messages": _USER}, 400, "exactly one of prompt"),
    BadInput(TOK, {"prompt": 5}, 400, "prompt"),
    BadInput(TOK, {"prompt": ["a", 1]}, 400, "prompt"),
    BadInput(TOK, {"messages": []}, 400, "messages"),
    BadInput(TOK, {"messages": [{"role": "robot", "content": "x"}]}, 400, "robot"),
    BadInput(TOK, {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "with messages"),
    BadInput(TOK, {"messages": _USER, "tools": [{"type": "x"}]}, 400, "tools[0]"),
    BadInput(TOK, {"messages": _USER, "chat_template_kwargs": {"tokenize": True}}, 400, "tokenize"),
    BadInput(TOK, {"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    BadInput(TOK, {"model": "no-such-model", "prompt": "hi"}, 404, "no-such-model"),
    BadInput(DETOK, {}, 400, "tokens"),
    BadInput(DETOK, {"tokens": "hi"}, 400, "tokens"),
    BadInput(DETOK, {"tokens": [1.5]}, 400, "tokens"),
    BadInput(DETOK, {"tokens": [5, 10**9]}, 400, "outside the vocabulary"),
    BadInput(DETOK, {"tokens": [[5], [-1]]}, 400, "tokens[1]"),
    BadInput(DETOK, {"model": "no-such-model", "tokens": [5]}, 404, "no-such-model"),
]


def fill(obj: Any, model: str) -> Any:
    if obj == MODEL:
        return model
    if isinstance(obj, dict):
        return {k: fill(v, model) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, model) for v in obj]
    return obj


def send(client: httpx.Client, route: str, body: Any = None, model: str = "",
         headers: Optional[dict] = None) -> httpx.Response:
    method, path = route.split(" ", 1)
    if isinstance(body, str):
        return client.request(method, path, content=body.encode(), headers={
            "content-type": "application/json", **(headers or {})})
    kw = {} if body is None else {"json": fill(body, model)}
    return client.request(method, path, headers=headers, **kw)


def assert_openai_error(r: httpx.Response, status: int, substring: str = "") -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert substring.lower() in err["message"].lower(), f"{substring!r} not in {err['message']!r}"
    return err


def good_request(client: httpx.Client, model: str, headers: Optional[dict] = None) -> dict:
    r = send(client, CHAT, _chat(max_tokens=2), model, headers)
    assert r.status_code == 200, r.text[:300]
    return r.json()


def run_bad_inputs(client: httpx.Client, model: str, cases: list[BadInput] = BAD_INPUTS) -> None:
    """Each bad input gets its 4xx with OpenAI's body naming the problem, and a good
    request right after it is served."""
    for case in cases:
        r = send(client, case.route, case.body, model)
        try:
            assert_openai_error(r, case.status, case.substring)
        except AssertionError as e:
            raise AssertionError(f"{case.route} {str(case.body)[:120]}: {e}") from None
        good_request(client, model)


def sse_events(text: str) -> list[Any]:
    """The data of each server-sent event; '[DONE]' stays a string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block[:100]!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_usage(usage: dict, max_completion: Optional[int] = None) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)
    if max_completion is not None:
        assert usage["completion_tokens"] <= max_completion


def check_models(client: httpx.Client, model: str) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and model in [m["id"] for m in body["data"]]
    card = client.get(f"/v1/models/{model}").json()
    assert card["id"] == model and card["object"] == "model"


def check_chat(client: httpx.Client, model: str) -> None:
    body = send(client, CHAT, _chat(max_tokens=5, n=3, logprobs=True, top_logprobs=2), model).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and isinstance(body["system_fingerprint"], str)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
        content = c["logprobs"]["content"]
        assert 1 <= len(content) <= 5
        for t in content:
            assert isinstance(t["token"], str) and t["logprob"] <= 0 and isinstance(t["bytes"], list)
            assert len(t["top_logprobs"]) == 2
    check_usage(body["usage"], 15)


def check_chat_stream(client: httpx.Client, model: str) -> None:
    for include_usage in (False, True):
        r = send(client, CHAT, _chat(max_tokens=5, n=2, stream=True,
                                     stream_options={"include_usage": include_usage}), model)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        for i in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
            assert mine[0]["delta"]["role"] == "assistant"
            assert [m["finish_reason"] for m in mine if m["finish_reason"]] in (["stop"], ["length"])
        if include_usage:
            assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
            check_usage(chunks[-1]["usage"], 10)
        else:
            assert all("usage" not in c for c in chunks)


def check_completions(client: httpx.Client, model: str) -> None:
    body = send(client, CMPL, _cmpl(prompt=["Hello", "World"], n=2, max_tokens=3), model).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    check_usage(body["usage"], 12)

    body = send(client, CMPL, _cmpl(prompt="Hello there", echo=True, logprobs=2, max_tokens=3),
                model).json()
    c = body["choices"][0]
    assert c["text"].startswith("Hello there")
    lp = c["logprobs"]
    k = len(lp["tokens"])
    assert k == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"] if t is not None)

    r = send(client, CMPL, _cmpl(prompt=[[1, 2, 3], [4, 5]], stream=True, max_tokens=3,
                                 stream_options={"include_usage": True}), model)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert {c["choices"][0]["index"] for c in events[:-2]} == {0, 1}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] <= 6


def check_native(client: httpx.Client, model: str) -> None:
    out = send(client, GEN, {"text": "Hello", "sampling_params": {"max_new_tokens": 3}}).json()
    assert set(out) >= {"text", "output_ids", "meta_info"}
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) <= 3
    outs = send(client, GEN, {"input_ids": [[1, 2], [3, 4]],
                              "sampling_params": {"max_new_tokens": 2, "n": 2}}).json()
    assert isinstance(outs, list) and len(outs) == 4
    r = send(client, GEN, {"text": "Hello", "stream": True, "sampling_params": {"max_new_tokens": 4}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "stream text must be cumulative"
    assert events[-2]["meta_info"]["finish_reason"] is not None
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is True and info["served_model_name"] == model
    server = client.get("/get_server_info").json()
    assert "version" in server and "scheduler_info" in server
    assert client.post("/flush_cache").status_code == 200
    assert client.post("/abort_request", json={"rid": "not-running"}).status_code == 200


def check_metrics(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    for name in ("anyserve:num_running_reqs", "anyserve:num_queue_reqs", "anyserve:token_usage",
                 "anyserve:cache_hit_rate", "anyserve:prompt_tokens_total",
                 "anyserve:generation_tokens_total", "anyserve:num_requests_total",
                 "anyserve:num_aborted_requests_total",
                 "anyserve:time_to_first_token_seconds_bucket",
                 "anyserve:inter_token_latency_seconds_bucket",
                 "anyserve:e2e_request_latency_seconds_bucket",
                 'anyserve:step_seconds_total{kind="decode"}', 'anyserve:steps_total{kind="prefill"}'):
        assert f"\n{name}" in text, f"{name} missing from /metrics"


def run_field_checks(client: httpx.Client, model: str) -> None:
    check_models(client, model)
    check_chat(client, model)
    check_chat_stream(client, model)
    check_completions(client, model)
    check_native(client, model)
    check_metrics(client)
