"""The HTTP front end over a fake TokenizerManager: every route, field and error path.

The shape checks and the bad-input table live in tests/http_cases.py so that they can be
run against a real server too; here they run in-process, plus what only the fake can show
(exact texts, what reached the TokenizerManager, aborts on disconnect).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from engine.entrypoints.http_server import build_app
from engine.entrypoints.metrics import ServerMetrics
from engine.io_struct import SchedulerStats, StepTotals
from engine.server_args import ServerArgs
import http_cases as hc
from fake_tokenizer_manager import CRASH_MARKER, REPLY, FakeTokenizerManager, prompt_logprob

pytestmark = pytest.mark.timeout(60)
MODEL = "fake-model"
KEY = "sk-test-key"
USER = [{"role": "user", "content": "Hi"}]


def make(token_delay: float = 0.0, **args) -> tuple[FakeTokenizerManager, TestClient]:
    sa = ServerArgs(model_path="/models/fake-model", served_model_name=MODEL, device="cpu", **args)
    tm = FakeTokenizerManager(server_args=sa, token_delay=token_delay)
    return tm, TestClient(build_app(tm, sa))


@pytest.fixture
def fake():
    tm, client = make()
    with client:
        yield tm, client


def chat(client: TestClient, **kw) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **kw})


# ---- the reusable cases ------------------------------------------------------------------
def test_bad_inputs_get_4xx_with_openai_body_then_good_request_served(fake):
    assert len(hc.BAD_INPUTS) >= 20
    hc.run_bad_inputs(fake[1], MODEL)


def test_field_checks(fake):
    hc.run_field_checks(fake[1], MODEL)


# ---- what reaches the TokenizerManager ---------------------------------------------------
def test_chat_default_max_tokens_fills_context_and_finishes_with_stop(fake):
    tm, client = fake
    body = chat(client).json()
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_len = body["usage"]["prompt_tokens"]
    assert tm.requests[-1].sampling_params["max_new_tokens"] == tm.context_len - prompt_len


def test_chat_sampling_fields_reach_the_tokenizer_manager(fake):
    tm, client = fake
    body = chat(client, max_completion_tokens=7, max_tokens=99, temperature=0.5, top_p=0.9,
                top_k=5, min_p=0.1, seed=11, presence_penalty=0.5, frequency_penalty=-0.5,
                repetition_penalty=1.2, ignore_eos=True, min_tokens=2, logit_bias={"65": 3},
                skip_special_tokens=False, stop=["zzz"], user="u1").json()
    sp = tm.requests[-1].sampling_params
    assert sp == {**sp, "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
                  "min_p": 0.1, "seed": 11, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                  "repetition_penalty": 1.2, "ignore_eos": True, "min_new_tokens": 2,
                  "logit_bias": {"65": 3.0}, "skip_special_tokens": False, "stop": ["zzz"]}
    assert tm.requests[-1].rid == body["id"][len("chatcmpl-"):]


def test_chat_messages_become_template_input(fake):
    tm, client = fake
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    msgs = [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert chat(client, messages=msgs, tools=tools, tool_choice="auto").status_code == 200
    sent, sent_tools = tm.last_chat
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[1]["content"] == "a\nb" and sent[3]["tool_call_id"] == "c1" and sent_tools == tools


@pytest.mark.parametrize("parser", ["mistral", "mistral_v11"])
def test_mistral_tool_calls_keep_special_tokens_in_the_answer(parser):
    """Mistral's [TOOL_CALLS] (and v11's [ARGS]) markers are special tokens: with tools offered
    the answer keeps special tokens so the parser sees them; without tools the request is left as sent."""
    tm, client = make(tool_call_parser=parser)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with client:
        assert chat(client, tools=tools).status_code == 200
        assert tm.requests[-1].sampling_params["skip_special_tokens"] is False
        assert chat(client).status_code == 200
        assert tm.requests[-1].sampling_params["skip_special_tokens"] is True
        assert chat(client, tools=tools, tool_choice="none").status_code == 200
        assert tm.requests[-1].sampling_params["skip_special_tokens"] is True


V11_ANSWER = 'Let me look.[TOOL_CALLS]f[ARGS]{"city": "Oslo"}[TOOL_CALLS]g[CALL_ID]a1B2c3D4e[ARGS]{}'


def test_mistral_v11_answer_gives_the_same_tool_calls_whole_and_streamed(monkeypatch):
    """One token per character, so the stream is cut inside every marker and the JSON."""
    import fake_tokenizer_manager

    monkeypatch.setattr(fake_tokenizer_manager, "REPLY", V11_ANSWER)
    tm, client = make(tool_call_parser="mistral_v11")
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("f", "g")]
    with client:
        whole = chat(client, tools=tools).json()["choices"][0]
        events = hc.sse_events(chat(client, tools=tools, stream=True).text)[:-1]
    msg = whole["message"]
    assert whole["finish_reason"] == "tool_calls" and msg["content"] == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == \
        [("f", '{"city": "Oslo"}'), ("g", "{}")]
    content, calls = "", {}
    for e in events:
        delta = e["choices"][0]["delta"]
        content += delta.get("content") or ""
        for d in delta.get("tool_calls") or []:
            c = calls.setdefault(d["index"], {"name": d["function"].get("name"), "arguments": ""})
            c["arguments"] += d["function"].get("arguments") or ""
    assert content == "Let me look." and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("f", '{"city": "Oslo"}'), ("g", "{}")]


def test_stop_string_trimmed_and_seed_varies_per_sample(fake):
    _, client = fake
    body = chat(client, stop="fox").json()
    assert body["choices"][0]["message"]["content"] == "The quick brown "
    body = chat(client, n=2, seed=3, max_tokens=4).json()
    assert [c["message"]["content"] for c in body["choices"]] == [REPLY[3:7], REPLY[4:8]]


def test_chat_stream_logprobs_cover_every_token_once(fake):
    _, client = fake
    r = chat(client, max_tokens=6, stream=True, logprobs=True, top_logprobs=3)
    chunks = [c for c in hc.sse_events(r.text)[:-1] if c["choices"][0]["logprobs"]]
    entries = sum((c["choices"][0]["logprobs"]["content"] for c in chunks), [])
    assert "".join(e["token"] for e in entries) == REPLY[:6]
    assert all(len(e["top_logprobs"]) == 3 for e in entries)


def test_response_format_becomes_grammar_keys(fake):
    tm, client = fake
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(tm.requests[-1].sampling_params["json_schema"]) == schema
    chat(client, response_format={"type": "json_object"})
    assert json.loads(tm.requests[-1].sampling_params["json_schema"]) == {"type": "object"}
    chat(client, response_format={"type": "text"})
    assert "json_schema" not in tm.requests[-1].sampling_params


def test_sglang_grammar_fields_on_openai_routes(fake):
    """json_schema, regex and ebnf as top-level fields (SGLang's extensions), on chat and completions;
    two constraints at once, or a schema given twice, are a 400 naming the fields."""
    tm, client = fake
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    for route, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hi"})):
        for field, value in (("json_schema", schema), ("regex", "[ab]+"), ("ebnf", 'root ::= "x"')):
            r = client.post(route, json={"model": MODEL, **body, field: value})
            assert r.status_code == 200, r.text
            sp = tm.requests[-1].sampling_params
            assert sp[field] == value and not ({"json_schema", "regex", "ebnf"} - {field}) & set(sp)
        r = client.post(route, json={"model": MODEL, **body, "json_schema": schema, "regex": "a"})
        hc.assert_openai_error(r, 400, "cannot be combined with json_schema")
        r = client.post(route, json={"model": MODEL, **body, "json_schema": schema,
                                     "response_format": {"type": "json_object"}})
        hc.assert_openai_error(r, 400, "json_schema cannot be combined with response_format")
        r = client.post(route, json={"model": MODEL, **body, "json_schema": {"type": "object"}})
        hc.assert_openai_error(r, 400, "json_schema")


def test_response_format_rejected_without_grammar_backend():
    _, client = make(grammar_backend="none")
    r = chat(client, response_format={"type": "json_object"})
    hc.assert_openai_error(r, 400, "--grammar-backend none")
    assert chat(client, response_format={"type": "text"}).status_code == 200


def test_model_path_accepted_as_model_name(fake):
    _, client = fake
    assert chat(client, model="/models/fake-model").status_code == 200
    assert client.get("/v1/models//models/fake-model").status_code == 200


# ---- completions specifics -----------------------------------------------------------------
def test_completions_echo_token_prompt_and_indices(fake):
    _, client = fake
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": [[72, 105], [79, 107]],
                                                "n": 2, "echo": True, "max_tokens": 2}).json()
    assert [c["text"] for c in body["choices"]] == ["HiTh", "HiTh", "OkTh", "OkTh"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]


def test_completions_stream_echo_logprobs_offsets(fake):
    _, client = fake
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hey", "echo": True,
                                             "logprobs": 1, "max_tokens": 3, "stream": True})
    chunks = hc.sse_events(r.text)[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    offsets = sum((c["choices"][0]["logprobs"]["text_offset"] for c in chunks), [])
    tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks), [])
    assert text == "HeyThe" and tokens == list("HeyThe") and offsets == [0, 1, 2, 3, 4, 5]


def test_completions_echo_max_tokens_zero_scores_the_prompt(fake):
    """lm-eval-harness's loglikelihood request: the prompt's logprobs, no generation."""
    tm, client = fake
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": [[72, 101, 121, 33]], "echo": True,
                                                "logprobs": 1, "max_tokens": 0}).json()
    c = body["choices"][0]
    assert c["text"] == "Hey!" and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["tokens"] == list("Hey!") and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"] == [None] + [pytest.approx(prompt_logprob(i)) for i in (1, 2, 3)]
    assert lp["top_logprobs"][0] is None
    assert [list(t) for t in lp["top_logprobs"][1:]] == [["e"], ["y"], ["!"]]
    assert tm.requests[-1].logprob_start_len == 0 and body["usage"]["completion_tokens"] == 0


def test_completions_prompt_logprobs_only_with_echo(fake):
    tm, client = fake
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hey", "logprobs": 2,
                                                "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"]["tokens"] == ["T", "h"]
    assert tm.requests[-1].logprob_start_len is None
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hey", "echo": True,
                                                "logprobs": 2, "max_tokens": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list("HeyTh") and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:3] == [pytest.approx(prompt_logprob(1)), pytest.approx(prompt_logprob(2))]
    assert [len(t) for t in lp["top_logprobs"][1:]] == [2, 2, 2, 2]


def test_generate_input_token_logprobs_per_prompt(fake):
    tm, client = fake
    body = client.post("/generate", json={"text": ["Hello", "Hi"], "return_logprob": True, "top_logprobs_num": 1,
                                          "logprob_start_len": [1, 0],
                                          "sampling_params": {"max_new_tokens": 1}}).json()
    assert [e[1] for e in body[0]["meta_info"]["input_token_logprobs"]] == [ord(c) for c in "ello"]
    first = body[1]["meta_info"]
    assert first["input_token_logprobs"][0] == [None, ord("H"), "H"] and first["input_top_logprobs"][0] is None
    assert first["input_token_logprobs"][1][0] == pytest.approx(prompt_logprob(1))
    one = client.post("/generate", json={"text": "Hello", "return_logprob": True}).json()   # SGLang's default
    assert [e[1] for e in one["meta_info"]["input_token_logprobs"]] == [ord("o")]


# ---- errors ----------------------------------------------------------------------------------
def test_api_key_required_except_health_and_metrics():
    _, client = make(api_key=KEY)
    hc.assert_openai_error(chat(client), 401, "API key")
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert hc.assert_openai_error(r, 401, "incorrect")["code"] == "invalid_api_key"
    hc.assert_openai_error(client.post("/generate", json={"text": "x"}), 401)
    for path in ("/health", "/health_generate", "/metrics"):
        assert client.get(path).status_code == 200, path
    hc.good_request(client, MODEL, headers={"Authorization": f"Bearer {KEY}"})
    info = client.get("/get_server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert KEY not in json.dumps(info)


def test_dead_scheduler_answers_503_then_recovers(fake):
    tm, client = fake
    tm.alive = False
    hc.assert_openai_error(chat(client), 503, "scheduler")
    hc.assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)
    assert client.get("/health").status_code == 503
    tm.alive = True
    assert client.get("/health").status_code == 200
    hc.good_request(client, MODEL)


def test_unexpected_exception_is_500_with_openai_body_and_server_keeps_serving(fake):
    _, client = fake
    for stream in (False, True):
        r = chat(client, messages=[{"role": "user", "content": CRASH_MARKER}], stream=stream)
        assert hc.assert_openai_error(r, 500, "internal error")["type"] == "internal_server_error"
        hc.good_request(client, MODEL)


def test_client_errors_with_the_official_openai_client(live):
    c = live["client"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    bad = openai.OpenAI(base_url=live["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- aborts, disconnects, flush ------------------------------------------------------------
async def _async_client(tm_delay: float):
    tm, client = make(token_delay=tm_delay)
    return tm, httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t")


def test_abort_request_turns_into_error_and_flush_waits_for_idle():
    asyncio.run(_abort_and_flush())


async def _abort_and_flush() -> None:
    tm, ac = await _async_client(0.01)
    async with ac:
        job = asyncio.create_task(ac.post("/v1/chat/completions", json={
            "model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True}))
        stream_job = asyncio.create_task(ac.post("/v1/completions", json={
            "model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}))
        while len(tm.running) < 2:
            await asyncio.sleep(0.01)
        r = await ac.post("/flush_cache")
        hc.assert_openai_error(r, 400, "running")
        r = await ac.post("/abort_request", json={"abort_all": True})
        assert len(r.json()["aborted"]) == 2
        hc.assert_openai_error(await job, 503, "aborted")
        events = hc.sse_events((await stream_job).text)
        assert events[-1] == "[DONE]" and "aborted" in events[-2]["error"]["message"]
        assert {how for _, how in tm.aborts} == {"abort_request"}
        assert (await ac.post("/flush_cache")).status_code == 200


def test_disconnect_mid_stream_aborts_the_request(live):
    tm = live["tm"]
    before = len(tm.consumer_gone())
    with httpx.Client(base_url=live["url"], headers=live["auth"]) as c:
        with c.stream("POST", "/generate", json={"text": "x", "stream": True, "sampling_params": {
                "max_new_tokens": 500, "ignore_eos": True}}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    _wait_for(lambda: len(tm.consumer_gone()) > before)
    assert not tm.running


def test_disconnect_during_non_stream_request_aborts_it(live):
    tm = live["tm"]
    before = len(tm.consumer_gone())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live["url"] + "/v1/completions", headers=live["auth"], timeout=0.3, json={
            "model": MODEL, "prompt": "x", "max_tokens": 500, "ignore_eos": True})
    _wait_for(lambda: len(tm.consumer_gone()) > before)


def _wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


# ---- the official client against a live uvicorn server -----------------------------------
@pytest.fixture(scope="module")
def live():
    sa = ServerArgs(model_path="/models/fake-model", served_model_name=MODEL, device="cpu", api_key=KEY)
    tm = FakeTokenizerManager(server_args=sa, token_delay=0.002, context_len=4096)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(tm, sa), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_for(lambda: server.started)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield {"tm": tm, "url": url, "auth": {"Authorization": f"Bearer {KEY}"},
           "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)}
    server.should_exit = True
    thread.join(5)


def test_official_client_chat_completions_and_models(live):
    c = live["client"]
    assert [m.id for m in c.models.list().data] == [MODEL]
    resp = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, n=2,
                                     logprobs=True, top_logprobs=2)
    assert [ch.message.content for ch in resp.choices] == ["The q", "The q"]
    assert len(resp.choices[0].logprobs.content[0].top_logprobs) == 2
    assert resp.usage.completion_tokens == 10
    stream = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == REPLY[:8]
    assert chunks[-1].usage.completion_tokens == 8
    comp = c.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, echo=True)
    assert [ch.text for ch in comp.choices] == ["aThe", "bThe"]


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_names_and_counts():
    m = ServerMetrics()
    m.on_first_token(0.05)
    m.on_tokens(0.01, n=3)
    m.on_finish(1.0, prompt_tokens=10, completion_tokens=4, cached_tokens=6, aborted=True)
    m.update_scheduler_stats(SchedulerStats(num_running_reqs=2, num_queue_reqs=1, token_usage=0.5,
                                            cache_hit_rate=0.25, max_total_tokens=100,
                                            available_tokens=50, evictable_tokens=5))
    for seconds, steps in ((0.5, 2), (1.25, 7)):     # the scheduler's totals only grow
        m.update_scheduler_stats(SchedulerStats(
            num_running_reqs=2, num_queue_reqs=1, token_usage=0.5, cache_hit_rate=0.25, max_total_tokens=100,
            available_tokens=50, evictable_tokens=5,
            step_totals=StepTotals(decode_seconds=seconds, decode_steps=steps, prefill_seconds=0.25,
                                   prefill_steps=1)))
    text = m.render().decode()
    for line in ('anyserve:step_seconds_total{kind="decode"} 1.25', 'anyserve:steps_total{kind="decode"} 7.0',
                 'anyserve:step_seconds_total{kind="prefill"} 0.25', 'anyserve:steps_total{kind="prefill"} 1.0'):
        assert f"\n{line}\n" in text, line
    for line in ("anyserve:num_running_reqs 2.0", "anyserve:num_queue_reqs 1.0",
                 "anyserve:token_usage 0.5", "anyserve:cache_hit_rate 0.25",
                 "anyserve:prompt_tokens_total 10.0", "anyserve:generation_tokens_total 4.0",
                 "anyserve:num_requests_total 1.0", "anyserve:num_aborted_requests_total 1.0",
                 "anyserve:inter_token_latency_seconds_count 3.0",
                 "anyserve:time_to_first_token_seconds_count 1.0",
                 "anyserve:e2e_request_latency_seconds_count 1.0"):
        assert f"\n{line}\n" in text, line


def test_metrics_route_reflects_requests_and_scheduler(fake):
    tm, client = fake
    chat(client, max_tokens=3)
    text = client.get("/metrics").text
    assert "\nanyserve:generation_tokens_total 3.0\n" in text
    assert "\nanyserve:token_usage 0.25\n" in text


# ---- /v1/tokenize and /v1/detokenize -----------------------------------------------------
@pytest.mark.parametrize("prefix", ["/v1", ""])     # SGLang's paths and vLLM's
def test_tokenize_prompts_and_detokenize_back(fake, prefix):
    tm, client = fake
    sent = len(tm.requests)
    body = client.post(f"{prefix}/tokenize", json={"model": MODEL, "prompt": "Hello",
                                                   "return_token_strs": True}).json()
    assert body == {"tokens": [72, 101, 108, 108, 111], "count": 5, "max_model_len": tm.context_len,
                    "token_strs": list("Hello")}
    body = client.post(f"{prefix}/tokenize", json={"prompt": ["ab", "", "c"]}).json()   # model optional
    assert body["tokens"] == [[97, 98], [], [99]] and body["count"] == [2, 0, 1]
    assert client.post(f"{prefix}/detokenize", json={"tokens": [72, 105]}).json() == {"text": "Hi", "prompt": "Hi"}
    nested = client.post(f"{prefix}/detokenize", json={"tokens": [[72], [], [2, 105]]}).json()
    assert nested["text"] == ["H", "", "i"]                                 # id 2: special, skipped
    kept = client.post(f"{prefix}/detokenize", json={"tokens": [2, 105], "skip_special_tokens": False}).json()
    assert kept["text"] == "\x02i"
    assert len(tm.requests) == sent                                         # nothing reached the scheduler


def test_tokenize_messages_counts_what_chat_completions_sends(fake):
    tm, client = fake
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    kwargs = {"enable_thinking": False}
    tok = client.post("/v1/tokenize", json={"model": MODEL, "messages": messages,
                                            "chat_template_kwargs": kwargs}).json()
    usage = chat(client, messages=messages, chat_template_kwargs=kwargs, max_tokens=2).json()["usage"]
    assert tok["count"] == usage["prompt_tokens"] == len(tok["tokens"])
    assert tok["tokens"] == tm.requests[-1].input_ids                        # the very prompt it generated from
    without = client.post("/v1/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert "".join(map(chr, without["tokens"])).endswith("Hi there\n")      # no assistant header
