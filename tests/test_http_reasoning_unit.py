"""--reasoning-parser and chat_template_kwargs over the fake TokenizerManager: reasoning_content
whole and streamed (one token per character, so the stream is cut inside every tag),
separate_reasoning, tool calls after the reasoning, and the template's arguments."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import fake_tokenizer_manager
import http_cases as hc
from engine.entrypoints.http_server import build_app
from engine.server_args import ServerArgs
from fake_tokenizer_manager import FakeTokenizerManager

pytestmark = pytest.mark.timeout(60)
MODEL = "fake-model"
ANSWER = "<think>\nThe fox is quick.\n</think>\n\nIt jumps."
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.fixture
def serve(monkeypatch):
    """serve(answer, **server_args) → (fake TokenizerManager, client) whose model writes answer."""
    def start(answer: str = ANSWER, **args):
        monkeypatch.setattr(fake_tokenizer_manager, "REPLY", answer)
        sa = ServerArgs(model_path="/models/fake-model", served_model_name=MODEL, device="cpu", **args)
        tm = FakeTokenizerManager(server_args=sa, token_delay=0.001)     # an update per token
        return tm, TestClient(build_app(tm, sa))
    return start


def chat(client: TestClient, **kw) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                  **kw})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(client: TestClient, **kw) -> tuple[str, str, list[dict]]:
    """(reasoning, content, chunks) of a streamed answer."""
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                  "stream": True, **kw})
    chunks = hc.sse_events(r.text)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return ("".join(d.get("reasoning_content") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas), chunks)


def test_reasoning_content_whole_and_streamed(serve):
    _, client = serve(reasoning_parser="qwen3")
    with client:
        msg = chat(client)["choices"][0]["message"]
        reasoning, content, chunks = streamed(client, stream_options={"include_usage": True})
    assert (msg["reasoning_content"], msg["content"]) == ("The fox is quick.", "It jumps.")
    assert (reasoning, content) == ("The fox is quick.", "It jumps.")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    # reasoning chunks first, then content chunks; no chunk carries both
    kinds = [("r" if d.get("reasoning_content") else "") + ("c" if d.get("content") else "") for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == ["r"] * kinds.count("r") + ["c"] * kinds.count("c") and kinds.count("r") > 5
    # completion tokens count the reasoning too (the fake's tokens are characters)
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER)


def test_r1_answer_without_opening_tag(serve):
    _, client = serve("Short thought.</think>Answer.", reasoning_parser="deepseek-r1")
    with client:
        msg = chat(client)["choices"][0]["message"]
        assert streamed(client)[:2] == ("Short thought.", "Answer.")
        cut = chat(client, max_tokens=5)["choices"][0]      # cut off inside the reasoning
    assert (msg["reasoning_content"], msg["content"]) == ("Short thought.", "Answer.")
    assert cut["message"]["reasoning_content"] == "Short" and cut["message"]["content"] is None
    assert cut["finish_reason"] == "length"


def test_separate_reasoning_false_and_no_flag_keep_the_answer_as_generated(serve):
    _, client = serve(reasoning_parser="qwen3")
    with client:
        msg = chat(client, separate_reasoning=False)["choices"][0]["message"]
        assert streamed(client, separate_reasoning=False)[:2] == ("", ANSWER)
    assert msg["content"] == ANSWER and "reasoning_content" not in msg
    _, client = serve()
    with client:
        body = chat(client)
        _, content, chunks = streamed(client)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "tool_calls": None}
    assert "completion_tokens_details" not in body["usage"]
    assert content == ANSWER and not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks)


def test_tool_call_after_reasoning_is_parsed_and_one_inside_it_is_not(serve):
    _, client = serve(f"<think>\nNot {CALL} yet.\n</think>\n\n{CALL}", reasoning_parser="qwen3",
                      tool_call_parser="qwen25")
    with client:
        choice = chat(client, tools=TOOLS)["choices"][0]
        reasoning, content, chunks = streamed(client, tools=TOOLS)
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and msg["content"] is None
    assert msg["reasoning_content"] == f"Not {CALL} yet."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [("f", '{"x": 1}')]
    calls = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert (reasoning, content) == (f"Not {CALL} yet.", "") and len({d["index"] for d in calls}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_grammar_keeps_the_whole_answer_as_content(serve):
    _, client = serve(reasoning_parser="deepseek-r1")
    with client:
        msg = chat(client, regex=".*")["choices"][0]["message"]
    assert msg["content"] == ANSWER and "reasoning_content" not in msg


def test_chat_template_kwargs_reach_the_template_and_turn_thinking_off(serve):
    tm, client = serve("It jumps.", reasoning_parser="qwen3")
    with client:
        on = chat(client)
        off = chat(client, chat_template_kwargs={"enable_thinking": False, "custom": [1]})
    assert tm.last_template_kwargs == {"enable_thinking": False, "custom": [1]}
    # the template prefilled the empty think block: "<think>\n\n</think>\n\n" is 19 more prompt tokens
    assert off["usage"]["prompt_tokens"] == on["usage"]["prompt_tokens"] + 19
    assert off["choices"][0]["message"]["content"] == "It jumps."       # thinking off: all content
    assert on["choices"][0]["message"]["reasoning_content"] == "It jumps."  # thinking on: all reasoning


@pytest.mark.parametrize("kwargs, message", [
    ({"tools": []}, "chat_template_kwargs: must not set 'tools'"),
    ({"add_generation_prompt": False}, "must not set 'add_generation_prompt'"),
    ({"messages": []}, "must not set 'messages'"),
    ([1, 2], "chat_template_kwargs"),
    ("enable_thinking=false", "chat_template_kwargs"),
])
def test_bad_chat_template_kwargs_are_a_400(serve, kwargs, message):
    _, client = serve()
    with client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      "chat_template_kwargs": kwargs})
    err = r.json()["error"]
    assert r.status_code == 400 and message in err["message"], err
    assert err["param"] == "chat_template_kwargs" and err["type"] == "invalid_request_error"


def test_reasoning_content_of_an_earlier_answer_reaches_the_template(serve):
    tm, client = serve()
    history = [{"role": "user", "content": "1+1?"},
               {"role": "assistant", "content": "2", "reasoning_content": "One and one."},
               {"role": "user", "content": "2+2?"}]
    with client:
        chat(client, messages=history)
    assert tm.last_chat[0][1]["reasoning_content"] == "One and one."


def _delta_kinds(chunks: list[dict]) -> list[tuple[str, str]]:
    """(kind, text) of each chunk's non-empty reasoning or content delta, in order."""
    out = []
    for c in chunks:
        d = c["choices"][0]["delta"] if c["choices"] else {}
        out += [(k, d[k]) for k in ("reasoning_content", "content") if d.get(k)]
    return out


@pytest.mark.parametrize("stream_reasoning", [True, False])
def test_stream_reasoning_false_sends_the_reasoning_as_one_delta_when_it_ends(serve, stream_reasoning):
    _, client = serve(reasoning_parser="qwen3")
    with client:
        reasoning, content, chunks = streamed(client, stream_reasoning=stream_reasoning)
    assert (reasoning, content) == ("The fox is quick.", "It jumps.")
    kinds = _delta_kinds(chunks)
    thoughts = [t for k, t in kinds if k == "reasoning_content"]
    if stream_reasoning:
        assert len(thoughts) > 5                                    # token by token
    else:
        assert thoughts == ["The fox is quick."]                    # held back, sent whole
    # the reasoning ends before the content starts, which still streams token by token
    assert [k for k, _ in kinds] == ["reasoning_content"] * len(thoughts) + ["content"] * (len(kinds) - len(thoughts))
    assert len(kinds) - len(thoughts) > 5


@pytest.mark.parametrize("parser, answer", [("qwen3", "<think>\nStill thinking it over"),
                                            ("deepseek-r1", "Still thinking it over")])
@pytest.mark.parametrize("max_tokens", [None, 12])
def test_stream_reasoning_false_sends_unclosed_reasoning_at_the_end(serve, parser, answer, max_tokens):
    """An answer that never writes </think> (it stops, or max_tokens cuts it): all reasoning, sent
    once, right before the finish chunk, and equal to the whole answer's reasoning_content."""
    _, client = serve(answer, reasoning_parser=parser)
    kw = {"max_tokens": max_tokens} if max_tokens else {}
    with client:
        whole = chat(client, **kw)["choices"][0]
        reasoning, content, chunks = streamed(client, stream_reasoning=False, **kw)
    assert reasoning == whole["message"]["reasoning_content"] and content == "" and whole["message"]["content"] is None
    assert _delta_kinds(chunks) == [("reasoning_content", reasoning)]
    said = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("reasoning_content")]
    assert said == [len(chunks) - 2] and chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert whole["finish_reason"] == ("length" if max_tokens else "stop")


def test_stream_reasoning_false_sends_held_reasoning_before_an_abort(serve):
    """Aborted mid-reasoning: what was held back comes as one delta before the error event."""
    import asyncio

    import httpx

    tm, client = serve("<think>\nStill thinking it over, ", reasoning_parser="qwen3")

    async def run() -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t") as ac:
            job = asyncio.create_task(ac.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "stream_reasoning": False, "max_tokens": 220, "ignore_eos": True}))
            while not tm.running and not job.done():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.06)                               # ~40 of its 220 tokens
            assert not job.done(), (await job).text[-500:]
            assert len((await ac.post("/abort_request", json={"abort_all": True})).json()["aborted"]) == 1
            return hc.sse_events((await job).text)

    events = asyncio.run(run())
    assert events[-1] == "[DONE]" and "aborted" in events[-2]["error"]["message"]
    kinds = _delta_kinds(events[:-2])
    assert len(kinds) == 1 and kinds[0][0] == "reasoning_content"
    held = kinds[0][1]
    assert len(held) > 20 and held.startswith("Still thinking it over, ")


def test_stream_reasoning_without_reasoning_or_stream_changes_nothing(serve):
    _, client = serve(reasoning_parser="qwen3")
    with client:
        msg = chat(client, stream_reasoning=False)["choices"][0]["message"]
        plain = streamed(client, separate_reasoning=False, stream_reasoning=False)
    assert (msg["reasoning_content"], msg["content"]) == ("The fox is quick.", "It jumps.")
    assert plain[:2] == ("", ANSWER) and len(_delta_kinds(plain[2])) > 5


@pytest.mark.parametrize("value", ["false", 0, None, [False]])
def test_stream_reasoning_must_be_a_bool(serve, value):
    _, client = serve(reasoning_parser="qwen3")
    with client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      "stream": True, "stream_reasoning": value})
    err = r.json()["error"]
    assert r.status_code == 400 and "stream_reasoning" in err["message"], err
    assert err["param"] == "stream_reasoning" and err["type"] == "invalid_request_error"
