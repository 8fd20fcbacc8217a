"""chat_template_kwargs on the tiny Qwen3 model (random weights, CPU): enable_thinking false
prefills the template's empty think block, which the engine then sees as prompt tokens."""
from __future__ import annotations

import httpx
import pytest

from engine import Engine
from engine.entrypoints.openai.context import ApiContext
from http_cases import sse_events
from server_fixture import running_server

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def test_enable_thinking_false_prefills_an_empty_think_block(qwen3_tiny):
    with Engine(model_path=str(qwen3_tiny), device="cpu", dtype="float32", reasoning_parser="qwen3") as e:
        tm = e.tokenizer_manager
        thinking = tm.apply_chat_template(USER)
        plain = tm.apply_chat_template(USER, template_kwargs={"enable_thinking": False})
        outs = e.generate(input_ids=[thinking, plain], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        end_id = ApiContext(tm, e.server_args).single_token_id("</think>")
    assert tm.tokenizer.decode(plain[len(thinking):]) == "<think>\n\n</think>\n\n"
    assert plain[:len(thinking)] == thinking
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(thinking), len(plain)]
    # the end tag is one token, so answers can report completion_tokens_details.reasoning_tokens
    assert end_id is not None and end_id in plain


BODY = {"model": "m", "messages": USER, "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(qwen3_tiny):
    """A real server with --reasoning-parser qwen3, whose tokenizer writes </think> as one token."""
    with running_server(qwen3_tiny, "--served-model-name", "m", "--reasoning-parser", "qwen3") as srv, \
            httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield c


def test_served_chat_reports_reasoning_tokens(client):
    """Usage counts the reasoning tokens, whole and streamed (with thinking off there are none)."""
    r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"] == 6
    r = client.post("/v1/chat/completions", json={**BODY, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    r = client.post("/v1/chat/completions", json={**BODY, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    streamed = events[-2]["usage"]
    assert events[-1] == "[DONE]" and streamed["completion_tokens_details"] == usage["completion_tokens_details"]
    assert streamed["completion_tokens"] == usage["completion_tokens"]


def test_served_stream_reasoning_false_sends_the_reasoning_once(client):
    """stream_reasoning false: the streamed reasoning is one delta, equal to the whole answer's
    reasoning_content, sent before any content (whether or not the 6 tokens closed the block)."""
    whole = client.post("/v1/chat/completions", json=BODY).json()["choices"][0]["message"]
    r = client.post("/v1/chat/completions", json={**BODY, "stream": True, "stream_reasoning": False})
    assert r.status_code == 200, r.text
    deltas = [e["choices"][0]["delta"] for e in sse_events(r.text)[:-1] if e["choices"]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert [d["reasoning_content"] for d in deltas if d.get("reasoning_content")] == [whole["reasoning_content"]]
    assert kinds[0] == "reasoning_content" and "reasoning_content" not in kinds[1:]
    assert "".join(d.get("content") or "" for d in deltas) == (whole["content"] or "")
