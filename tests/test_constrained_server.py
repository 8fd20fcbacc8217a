"""Structured output and tool calls through a real `anyserve serve` (tiny Qwen 2, CPU): the
official openai client, SGLang's /generate and gRPC. One server for the module."""
from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import openai
import pytest

from engine.entrypoints.grpc.codegen import load_stubs
from json_schema_corpus import SCHEMAS
from server_fixture import ServerProcess, running_server, wait_idle

MODEL = "tiny-qwen-structured"
pb2, pb2_grpc = load_stubs()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                       "required": ["tz"]}}}
TOOLS = [WEATHER, CLOCK]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(qwen2_tiny) -> ServerProcess:
    with running_server(qwen2_tiny, "--served-model-name", MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def valid(text: str, schema: dict) -> dict:
    obj = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                                    ).validate(obj)
    return obj


def check_calls(calls, names: set[str]) -> None:
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        valid(c.function.arguments, PARAMS[c.function.name])


# ---- response_format -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["realistic_event", "refs_and_defs", "any_of_objects"])
def test_chat_response_format_json_schema_validates(oai, name):
    schema = SCHEMAS[name]
    r = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=256, temperature=1.0, seed=4, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    for choice in r.choices:
        if choice.finish_reason == "stop":
            valid(choice.message.content, schema)
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_json_object_and_completions_response_format(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=128, seed=1,
                                    response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = SCHEMAS["object_with_arrays"]
    c = oai.completions.create(model=MODEL, prompt="Data:", max_tokens=128, temperature=0,
                               extra_body={"response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "x", "schema": schema}}})
    assert c.choices[0].finish_reason == "stop"
    valid(c.choices[0].text, schema)


def test_streamed_schema_samples_validate(oai):
    schema = SCHEMAS["array_of_objects"]
    texts = {0: "", 1: ""}
    reasons = {}
    stream = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=256, temperature=1.0, seed=7, n=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    for i in (0, 1):
        if reasons[i] == "stop":
            valid(texts[i], schema)


def test_native_generate_regex_ebnf_and_schema(http):
    r = http.post("/generate", json={"text": "IP:", "sampling_params": {
        "regex": r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
        "max_new_tokens": 32, "n": 2, "temperature": 1.0}})
    assert r.status_code == 200
    for out in r.json():
        a, b, c, d = (int(x) for x in out["text"].split("."))
        assert max(a, b, c, d) <= 255
    r = http.post("/generate", json={"text": "Yes or no:", "sampling_params": {
        "ebnf": 'root ::= "yes" | "no"', "max_new_tokens": 8}})
    assert r.json()["text"] in ("yes", "no")


# ---- bad constraints are 400s ----------------------------------------------------------------
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "wat"}}}


def test_bad_constraints_are_400_with_the_compilers_message(oai, http):
    with pytest.raises(openai.BadRequestError, match='Unsupported type "wat"'):
        oai.chat.completions.create(model=MODEL, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": BAD_SCHEMA}})
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        oai.completions.create(model=MODEL, prompt="x", extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}}})
    with pytest.raises(openai.BadRequestError, match="parenthesis"):
        oai.chat.completions.create(model=MODEL, messages=ASK, stream=True, extra_body={"regex": "(a"})
    r = http.post("/generate", json={"text": "x", "sampling_params": {"ebnf": "root ::= nothing"}})
    assert r.status_code == 400 and "nothing" in r.json()["error"]["message"]
    r = http.post("/generate", json={"text": "x", "sampling_params": {"regex": "a", "json_schema": "{}"}})
    assert r.status_code == 400
    wait_idle(http)
    assert oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices


def test_grpc_constraint_and_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb2_grpc.AnyserveStub(channel)
        req = pb2.GenerateRequest(text="Date:", sampling_params=pb2.SamplingParams(
            regex="20[0-9][0-9]-(0[1-9]|1[0-2])-[0-2][1-9]", max_new_tokens=32))
        text = "".join(m.text for m in stub.Generate(req, timeout=30))
        assert len(text) == 10 and text.startswith("20")
        bad = pb2.GenerateRequest(text="x", sampling_params=pb2.SamplingParams(json_schema='{"type": 3}'))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in e.value.details()


# ---- tool calls ------------------------------------------------------------------------------
@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_forced_tool_calls_whole_and_streamed_agree(oai, choice, names):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=1.0,
              seed=21)
    r = oai.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    check_calls(msg.tool_calls, names)
    if isinstance(choice, dict):
        assert len(msg.tool_calls) == 1

    calls: dict[int, dict] = {}
    reason = None
    for chunk in oai.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            assert not ch.delta.content
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert c["id"] is None and d.function.name
                    c["id"], c["name"] = d.id, d.function.name
                c["arguments"] += d.function.arguments or ""
            reason = ch.finish_reason or reason
    assert reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls]


def test_parallel_tool_calls_false_gives_one_call(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, max_tokens=200, seed=5)
    assert len(r.choices[0].message.tool_calls) == 1


def test_auto_and_none(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=40, seed=2)
    msg = r.choices[0].message
    if msg.tool_calls:                       # a random model rarely calls on its own
        check_calls(msg.tool_calls, {"get_weather", "get_time"})
    else:
        assert isinstance(msg.content, str) and r.choices[0].finish_reason in ("stop", "length")
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                    seed=2)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                         max_tokens=16, seed=2, stream=True)
    assert [c for c in stream]


@pytest.mark.parametrize("extra, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required"}, "no tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
])
def test_bad_tool_requests_are_400(http, extra, message):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
