"""End-to-end: the OpenAI API of a real `anyserve serve` process (tiny llama, CPU), driven by the
official `openai` client; the shared HTTP checks and bad-input table; 64 concurrent streams with
disconnects; --api-key on HTTP and gRPC. One server (started with --api-key) for the module."""
from __future__ import annotations

import asyncio
import json
import random
import re

import grpc
import httpx
import openai
import pytest

import http_cases
from engine.entrypoints.grpc.codegen import load_stubs
from server_fixture import ServerProcess, metric, running_server, wait_idle

API_KEY = "test-key-e2e"
MODEL = "tiny-llama-e2e"
CONTEXT = 32768        # beyond the model's 2048 positions, for long requests (see LEAVER_MAX_TOKENS)
pb2, pb2_grpc = load_stubs()


@pytest.fixture(scope="module")
def server(llama_tiny) -> ServerProcess:
    with running_server(llama_tiny, "--served-model-name", MODEL, "--context-length", str(CONTEXT),
                        api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers=server.auth_headers, timeout=60) as c:
        yield c


def _greedy_chat(oai: openai.OpenAI, content: str = "Tell me a story", **kw) -> str:
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                    temperature=0, **{"max_tokens": 16, **kw})
    return r.choices[0].message.content


# ---- chat ------------------------------------------------------------------------------------
ALL_ROLES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "What time"}, {"type": "text", "text": "is it?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    {"role": "assistant", "content": "It is noon."},
    {"role": "user", "content": "Thanks, and tomorrow?"},
]
EXTRA = {"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2}


def test_chat_every_field(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=ALL_ROLES, max_tokens=6, temperature=0.8, top_p=0.9, n=2, stop=["\n\n\n"],
        seed=11, presence_penalty=0.5, frequency_penalty=0.3, logprobs=True, top_logprobs=2,
        user="e2e-user", extra_body=EXTRA)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("length", "stop")
        assert 1 <= len(c.logprobs.content) <= 6
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert 2 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_every_field_matches_non_streaming(oai):
    common = dict(model=MODEL, messages=ALL_ROLES, max_completion_tokens=8, temperature=0, top_p=1.0,
                  seed=3, presence_penalty=0.0, frequency_penalty=0.0, user="e2e-user", extra_body=EXTRA)
    whole = oai.chat.completions.create(**common, logprobs=True, top_logprobs=1)
    stream = oai.chat.completions.create(**common, stream=True, stream_options={"include_usage": True},
                                         logprobs=True, top_logprobs=1)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    lps = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in lps] == [t.token for t in whole.choices[0].logprobs.content]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_token_limit_fields(oai, field):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"ignore_eos": True}, **{field: 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_stop_token_ids_and_min_tokens(oai, http):
    prompt = "Once upon a time"
    greedy = http.post("/generate", json={"text": prompt, "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}).json()["output_ids"]
    k = next(i for i in range(2, 8) if greedy[i] not in greedy[:i])    # first occurrence at position k

    def complete(**extra) -> openai.types.Completion:
        return oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"stop_token_ids": [greedy[k]], **extra})

    stopped = complete()
    assert stopped.usage.completion_tokens == k + 1 and stopped.choices[0].finish_reason == "stop"
    held = complete(min_tokens=k + 3)      # the stop token is banned until k + 3 tokens exist
    assert held.usage.completion_tokens >= k + 3


def test_n_samples(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                    max_tokens=4, temperature=3.0, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    stream = oai.completions.create(model=MODEL, prompt=["Hello", "World"], n=2, max_tokens=3, stream=True,
                                    extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}
    assert chunks[-1].usage.completion_tokens == 12


def test_same_seed_reproduces(oai):
    def chat(seed: int) -> str:
        return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=12, temperature=3.0, seed=seed).choices[0].message.content

    def cmpl(seed: int) -> str:
        return oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=3.0,
                                      seed=seed).choices[0].text

    for gen in (chat, cmpl):
        assert gen(1234) == gen(1234)
        assert len({gen(s) for s in (1, 2, 3)}) > 1, "different seeds should sample differently at temperature 3"


def test_stop_string_never_returned(oai):
    prompt = "Tell me a story"
    greedy = _greedy_chat(oai, prompt, max_tokens=24, extra_body={"ignore_eos": True})
    words = [m for m in re.finditer(r"[A-Za-z]{2,}", greedy) if greedy.find(m.group()) > 0]
    assert words, f"no usable stop word in the greedy output {greedy!r}"
    stop = words[0].group()
    expected = greedy[:greedy.find(stop)]
    for stream in (False, True):
        r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
                                        max_tokens=24, stop=[stop, "\x00never"], stream=stream,
                                        extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert stop not in text and text == expected and reason == "stop", (stop, text, greedy)
    c = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                               extra_body={"ignore_eos": True}).choices[0]
    assert stop not in c.text


def test_chat_logprobs_well_formed(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                    temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        tops = t.top_logprobs
        assert len(tops) == 3 and all(x.logprob <= 0 for x in tops)
        assert [x.logprob for x in tops] == sorted((x.logprob for x in tops), reverse=True)
        assert t.logprob == pytest.approx(tops[0].logprob, abs=1e-4)     # greedy picks the top token
        assert t.token == tops[0].token
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_completion_integer_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    for tok, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(x, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


# ---- completions -----------------------------------------------------------------------------
def test_completion_prompt_forms(oai):
    ids = [5, 17, 300, 42]
    for prompt, n_prompts in (("Hello", 1), (["Hello", "Good day"], 2), (ids, 1), ([ids, [7, 8, 9]], 2)):
        r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, n=2, temperature=0.7, top_p=0.95,
                                   seed=9, presence_penalty=0.1, frequency_penalty=0.1, stop=["\x00x"],
                                   user="u", extra_body={**EXTRA, "min_tokens": 1})
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert [c.index for c in r.choices] == list(range(2 * n_prompts))
        assert r.usage.completion_tokens == 6 * n_prompts
        assert all(isinstance(c.text, str) and c.finish_reason == "length" for c in r.choices)
    r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)


def test_completion_stream_every_field(oai):
    whole = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, logprobs=2,
                                   echo=True, extra_body={"ignore_eos": True})
    stream = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, logprobs=2,
                                    echo=True, stream=True, stream_options={"include_usage": True}, seed=1,
                                    user="u", extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and text.startswith("Hello there")
    assert chunks[-1].usage.completion_tokens == 6


def test_echo_returns_prompt_and_completion(oai):
    prompt = "Once upon a time"
    plain = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    echoed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain


def test_echo_max_tokens_zero_logprobs_scores_the_prompt(oai, http, llama_tiny):
    """lm-eval-harness's loglikelihood request (echo, logprobs=1, max_tokens=0) gets every prompt
    token's logprob given the ones before it: transformers' numbers, and /generate's."""
    import torch
    from hf_reference import hf_model

    ids = [random.Random(4).randrange(3, 1500) for _ in range(30)]
    r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(llama_tiny)(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [ref[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    native = http.post("/generate", json={"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                          "sampling_params": {"max_new_tokens": 0}}).json()["meta_info"]
    assert [e[1] for e in native["input_token_logprobs"]] == ids
    assert [e[0] for e in native["input_token_logprobs"][1:]] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_shared_prefix_reports_cached_tokens(oai):
    rng = random.Random()
    words = ["river", "stone", "light", "garden", "window", "music", "paper", "silver", "forest", "bridge"]
    system = " ".join(rng.choice(words) for _ in range(300))       # fresh each run: not cached before

    def ask(question: str):
        return oai.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}]).usage

    first, second = ask("First question?"), ask("Another one!")
    assert first.prompt_tokens >= 300
    assert second.prompt_tokens_details.cached_tokens >= 300 > first.prompt_tokens_details.cached_tokens


def test_tokenize_with_the_real_tokenizer_and_chat_template(oai, http, llama_tiny):
    """/v1/tokenize gives the ids the server generates from: the chat template's (count equals the
    chat answer's prompt_tokens) and the tokenizer's own for prompts; /v1/detokenize inverts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tiny)
    messages = [{"role": "user", "content": "Count these words, please"}]
    body = http.post("/v1/tokenize", json={"model": MODEL, "messages": messages}).json()
    usage = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["tokens"] == tok.encode(rendered, add_special_tokens=False)
    plain = http.post("/tokenize", json={"prompt": "river stone", "return_token_strs": True}).json()
    assert plain["tokens"] == tok.encode("river stone")                  # with the BOS the tokenizer adds
    assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"])
    bare = http.post("/v1/tokenize", json={"prompt": "river stone", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("river stone", add_special_tokens=False)
    assert http.post("/v1/detokenize", json={"tokens": plain["tokens"]}).json()["text"] == "river stone"
    usage = oai.completions.create(model=MODEL, prompt="river stone", max_tokens=1).usage
    assert usage.prompt_tokens == plain["count"]


# ---- shared checks, bad inputs -----------------------------------------------------------------
def test_field_checks_against_real_server(http):
    http_cases.run_field_checks(http, MODEL)


def test_bad_inputs_answered_4xx_then_served(http, oai):
    assert len(http_cases.BAD_INPUTS) >= 20
    http_cases.run_bad_inputs(http, MODEL)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True,
                                    top_logprobs=50)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        oai.completions.create(model="no-such-model", prompt="x")
    assert _greedy_chat(oai, max_tokens=2) is not None


# ---- concurrency -------------------------------------------------------------------------------
N_CLIENTS, N_LEAVERS, MAX_TOKENS = 64, 16, 64
# Clients that leave ask for many tokens: were they not aborted, they would still be decoding
# long after the others finished, and the server would not be idle when the test looks (the tiny
# model decodes ~1000 tokens/s, hence a context beyond its 2048 positions; see CONTEXT).
LEAVER_MAX_TOKENS = 30000


async def _one_stream(client: httpx.AsyncClient, i: int, leave: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Client {i} says hello"}],
            "max_tokens": LEAVER_MAX_TOKENS if leave else MAX_TOKENS, "temperature": 0.5, "seed": i,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events: list = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if leave and len(events) >= 4:
                break               # leaving the block closes the connection mid-stream
    return {"leave": leave, "events": events}


async def _many_streams(server: ServerProcess) -> list[dict]:
    limits = httpx.Limits(max_connections=N_CLIENTS + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.auth_headers, timeout=120,
                                 limits=limits) as client:
        leavers = set(random.Random(0).sample(range(N_CLIENTS), N_LEAVERS))
        return await asyncio.gather(*(_one_stream(client, i, i in leavers) for i in range(N_CLIENTS)))


def test_concurrent_streams_with_disconnects_free_everything(server, http, oai):
    results = asyncio.run(_many_streams(server))
    done = [r["events"] for r in results if not r["leave"]]
    assert len(done) == N_CLIENTS - N_LEAVERS
    for events in done:
        assert events[-1] == "[DONE]", events[-3:]
        chunks = events[:-1]
        assert all("error" not in c for c in chunks), chunks[-1]
        assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [x for x in reasons if x] == ["length"]
    assert all(len(r["events"]) == 4 and "[DONE]" not in r["events"] for r in results if r["leave"])
    gauges = wait_idle(http, timeout=5.0)
    assert gauges == {"num_running_reqs": 0, "num_queue_reqs": 0, "token_usage": 0}
    assert http.post("/flush_cache").status_code == 200      # only succeeds when nothing runs or waits
    assert _greedy_chat(oai, max_tokens=2) is not None


def test_client_disconnect_counts_as_aborted_request(http):
    def aborted() -> float:
        return metric(http.get("/metrics").text, "anyserve:num_aborted_requests_total")

    before = aborted()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": LEAVER_MAX_TOKENS, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    wait_idle(http)
    assert aborted() == before + 1


# ---- --api-key ----------------------------------------------------------------------------------
def test_api_key_http(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
            for method, path, kw in (("POST", "/v1/chat/completions", {"json": body}), ("GET", "/v1/models", {}),
                                     ("POST", "/generate", {"json": {"text": "x"}}), ("GET", "/get_server_info", {})):
                r = c.request(method, path, headers=headers, **kw)
                http_cases.assert_openai_error(r, 401, "API key")
        assert c.post("/v1/chat/completions", json=body, headers=server.auth_headers).status_code == 200
        assert c.get("/v1/models", headers=server.auth_headers).status_code == 200
        assert c.get("/health").status_code == 200               # probes stay open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    info = httpx.get(server.base_url + "/get_server_info", headers=server.auth_headers).json()
    assert API_KEY not in json.dumps(info)


def test_api_key_grpc(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb2_grpc.AnyserveStub(channel)
        req = pb2.GenerateRequest(text="Hi", sampling_params=pb2.SamplingParams(max_new_tokens=2))
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", API_KEY)]):
            with pytest.raises(grpc.RpcError) as e:
                stub.Health(pb2.HealthRequest(), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, metadata=metadata, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = [("authorization", f"Bearer {API_KEY}")]
        assert stub.Health(pb2.HealthRequest(), metadata=auth, timeout=10).serving
        msgs = list(stub.Generate(req, metadata=auth, timeout=30))
        assert sum(len(m.token_ids) for m in msgs) >= 1 and msgs[-1].usage.completion_tokens >= 1
