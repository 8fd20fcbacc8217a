"""End-to-end: SGLang's native routes and the gRPC API of a real `anyserve serve` process (tiny
qwen2, CPU): /generate in all its shapes, the admin routes, abort and client cancellation
(the server must end up idle), and gRPC's INVALID_ARGUMENT for bad input. One server for the
module."""
from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import httpx
import pytest

from engine.entrypoints.grpc.codegen import load_stubs
from http_cases import assert_openai_error, sse_events
from server_fixture import ServerProcess, running_server, wait_idle

MODEL = "tiny-qwen2-e2e"
pb2, pb2_grpc = load_stubs()
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
# A streaming consumer that falls behind gets the newest cumulative output only (FanOut), so
# a 6-token stream can arrive as one event on a busy machine: tests that count events stream
# STREAMED tokens, which take tens of milliseconds.
STREAMED = {**GREEDY, "max_new_tokens": 48}
# The tiny model decodes ~1000 tokens/s, so a request meant to outlive the test must be longer
# than its 2048 positions allow: the server admits CONTEXT tokens (a warning, no harm here) and a
# long request asks for LONG, which takes well over a minute unless it is aborted.
CONTEXT, LONG = 32768, 30000


@pytest.fixture(scope="module")
def server(qwen2_tiny) -> ServerProcess:
    with running_server(qwen2_tiny, "--served-model-name", MODEL, "--context-length", str(CONTEXT)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb2_grpc.AnyserveStub(channel)


def _generate(http: httpx.Client, **body: Any) -> Any:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text[:300]
    return r.json()


class _Stream(threading.Thread):
    """A streaming /generate read in a thread; `started` is set at its first event."""

    def __init__(self, server: ServerProcess, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.started = threading.Event()
        self.events: list = []

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=60) as c:
            with c.stream("POST", "/generate", json={**self.body, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.extend(sse_events(line + "\n\n"))
                        self.started.set()


# ---- /generate ------------------------------------------------------------------------------
def test_generate_single(http):
    out = _generate(http, text="The quick brown fox", sampling_params=GREEDY)
    assert isinstance(out["text"], str) and len(out["output_ids"]) == 6
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] == "length"
    again = _generate(http, text="The quick brown fox", sampling_params=GREEDY)
    assert (again["text"], again["output_ids"]) == (out["text"], out["output_ids"])     # greedy: repeatable


def test_generate_batch_of_texts_matches_single(http):
    texts = ["The quick brown fox", "Hello world, again"]
    outs = _generate(http, text=texts, sampling_params=GREEDY)
    assert isinstance(outs, list) and len(outs) == 2
    for text, out in zip(texts, outs):
        assert out["output_ids"] == _generate(http, text=text, sampling_params=GREEDY)["output_ids"]


def test_generate_input_ids_single_and_batch(http):
    ids = [[11, 22, 33, 44], [5, 6, 7]]
    single = _generate(http, input_ids=ids[0], sampling_params=GREEDY)
    assert isinstance(single, dict) and single["meta_info"]["prompt_tokens"] == 4
    batch = _generate(http, input_ids=ids, sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 3}])
    assert [len(o["output_ids"]) for o in batch] == [6, 3]
    assert batch[0]["output_ids"] == single["output_ids"]
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == [4, 3]


def test_generate_stream_is_cumulative_and_ends_done(http):
    whole = _generate(http, text="Once upon a time", sampling_params=STREAMED)
    r = http.post("/generate", json={"text": "Once upon a time", "sampling_params": STREAMED, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    outs = events[:-1]
    assert len(outs) >= 2
    for a, b in zip(outs, outs[1:]):
        assert b["text"].startswith(a["text"]) and b["output_ids"][:len(a["output_ids"])] == a["output_ids"]
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])
    assert outs[-1]["text"] == whole["text"] and outs[-1]["output_ids"] == whole["output_ids"]
    assert outs[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_logprobs(http):
    out = _generate(http, text="Hello", sampling_params=GREEDY, return_logprob=True, top_logprobs_num=3)
    meta = out["meta_info"]
    lps, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(lps) == len(tops) == len(out["output_ids"]) == 6
    for (lp, tid, text), top, chosen in zip(lps, tops, out["output_ids"]):
        assert lp <= 0 and tid == chosen and isinstance(text, str)
        assert len(top) == 3 and top[0][1] == chosen        # greedy takes the most likely token
        assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)


# ---- admin routes ---------------------------------------------------------------------------
def test_health_and_info_routes(server, http, qwen2_tiny):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["served_model_name"] == MODEL and info["is_generation"] is True
    assert info["model_path"] == str(qwen2_tiny)
    s = http.get("/get_server_info").json()
    assert s["port"] == server.port and s["grpc_port"] == server.grpc_port and s["device"] == "cpu"
    assert s["context_length"] == s["scheduler_info"]["context_length"] > 0 and s["vocab_size"] > 0
    assert s["scheduler_info"]["max_total_tokens"] > 0 and "version" in s
    assert s["kv_cache_dtype"] == "auto" and s["scheduler_info"]["kv_cache_dtype"] == s["scheduler_info"]["dtype"]
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_abort_request_and_flush_cache(server, http):
    assert http.post("/flush_cache").json()["success"] is True
    stream = _Stream(server, {"text": "Abort me", "rid": "native-abort-1",
                              "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}})
    stream.start()
    assert stream.started.wait(30), "the stream produced nothing"
    assert_openai_error(http.post("/flush_cache"), 400, "running")      # busy: refused
    r = http.post("/abort_request", json={"rid": "native-abort-1"})
    assert r.status_code == 200 and "native-abort-1" in r.json()["aborted"]
    stream.join(15)
    assert not stream.is_alive() and stream.events[-1] == "[DONE]"
    last = stream.events[-2]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < LONG
    wait_idle(http)
    assert http.post("/flush_cache").status_code == 200


def test_abort_all(server, http):
    streams = [_Stream(server, {"text": f"Long {i}", "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}})
               for i in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
    for s in streams:
        s.join(15)
        assert s.events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle(http)


# ---- gRPC -----------------------------------------------------------------------------------
def _sp(**kw: Any) -> Any:
    return pb2.SamplingParams(**{**STREAMED, **kw})


def _collect(msgs: list) -> tuple[str, list[int]]:
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids]


def test_grpc_generate_text_stream_matches_http(http, stub):
    msgs = list(stub.Generate(pb2.GenerateRequest(text="Once upon a time", sampling_params=_sp()), timeout=30))
    text, ids = _collect(msgs)
    whole = _generate(http, text="Once upon a time", sampling_params=STREAMED)
    assert ids == whole["output_ids"] and text == whole["text"]
    assert len(msgs) >= 2 and all(m.index == 0 and m.rid == msgs[0].rid for m in msgs)
    last = msgs[-1]
    assert last.finish_reason.type == pb2.FINISH_TYPE_LENGTH
    assert last.usage.completion_tokens == STREAMED["max_new_tokens"] and last.usage.prompt_tokens == whole["meta_info"]["prompt_tokens"]
    assert all(not m.HasField("finish_reason") for m in msgs[:-1])


def test_grpc_generate_token_ids_with_logprobs(http, stub):
    ids = [11, 22, 33, 44]
    msgs = list(stub.Generate(pb2.GenerateRequest(input_ids=pb2.TokenIds(ids=ids), sampling_params=_sp(),
                                                  return_logprob=True, top_logprobs_num=2), timeout=30))
    _, out_ids = _collect(msgs)
    assert out_ids == _generate(http, input_ids=ids, sampling_params=STREAMED)["output_ids"]
    lps = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in lps] == out_ids
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in lps)
    assert msgs[-1].usage.prompt_tokens == 4


def _http_entries(meta: dict, kind: str) -> list[tuple]:
    """SGLang's [logprob, token_id, text] lists as (token_id, logprob, text, top ids, top logprobs)."""
    tops = meta[f"{kind}_top_logprobs"]
    return [(tid, lp, text, [t[1] for t in top or []], [t[0] for t in top or []])
            for (lp, tid, text), top in zip(meta[f"{kind}_token_logprobs"], tops)]


def _grpc_entries(entries) -> list[tuple]:
    return [(e.token_id, e.logprob if e.HasField("logprob") else None, e.text,
             [t.token_id for t in e.top_logprobs], [t.logprob for t in e.top_logprobs]) for e in entries]


def _assert_same_entries(got: list[tuple], want: list[tuple]) -> None:
    assert [(t, text, top_ids) for t, _, text, top_ids, _ in got] == [(t, text, top) for t, _, text, top, _ in want]
    for (_, lp, _, _, top_lps), (_, want_lp, _, _, want_top) in zip(got, want):
        assert (lp is None) == (want_lp is None) and lp == pytest.approx(want_lp, abs=1e-5)
        assert top_lps == pytest.approx(want_top, abs=1e-5)


@pytest.mark.parametrize("start", [0, 2])
def test_grpc_prompt_logprobs_match_http(http, stub, start):
    ids = [11, 22, 33, 44, 55]
    msgs = list(stub.Generate(pb2.GenerateRequest(input_ids=pb2.TokenIds(ids=ids), sampling_params=_sp(),
                                                  return_logprob=True, top_logprobs_num=2,
                                                  logprob_start_len=start), timeout=30))
    meta = _generate(http, input_ids=ids, sampling_params=STREAMED, return_logprob=True, top_logprobs_num=2,
                     logprob_start_len=start)["meta_info"]
    got = _grpc_entries(msgs[0].input_logprobs)
    assert [e[0] for e in got] == ids[start:] and len(msgs) > 1
    assert all(not m.input_logprobs for m in msgs[1:])           # once, in the first message
    _assert_same_entries(got, _http_entries(meta, "input"))
    if start == 0:      # the first prompt token has no logprob: unset, no top list
        assert got[0][1] is None and got[0][3] == [] and all(e[1] is not None for e in got[1:])
    _assert_same_entries(_grpc_entries(e for m in msgs for e in m.logprobs), _http_entries(meta, "output"))


def test_grpc_unset_logprob_start_len_is_http_default(http, stub):
    msgs = list(stub.Generate(pb2.GenerateRequest(text="Once upon a time", sampling_params=_sp(),
                                                  return_logprob=True), timeout=30))
    meta = _generate(http, text="Once upon a time", sampling_params=GREEDY, return_logprob=True)["meta_info"]
    assert len(meta["input_token_logprobs"]) == 1                 # the last prompt token's
    _assert_same_entries(_grpc_entries(msgs[0].input_logprobs), _http_entries(meta, "input"))


def test_grpc_n_samples(stub):
    msgs = list(stub.Generate(pb2.GenerateRequest(text="Hi", sampling_params=_sp(n=2, temperature=1.0, seed=4),
                                                  rid="grpc-n"), timeout=30))
    assert {m.index for m in msgs} == {0, 1}
    assert sum(1 for m in msgs if m.HasField("finish_reason")) == 2


def test_grpc_health_and_model_info(stub, server, qwen2_tiny):
    assert stub.Health(pb2.HealthRequest(), timeout=10).serving
    assert stub.Health(pb2.HealthRequest(check_generate=True), timeout=30).serving
    info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
    assert info.served_model_name == MODEL and info.model_path == str(qwen2_tiny)
    assert info.device.startswith("cpu") and info.context_length > 0 and info.vocab_size > 0
    assert info.max_total_tokens > 0 and info.is_generation


def test_grpc_abort(stub, http):
    call = stub.Generate(pb2.GenerateRequest(text="Abort me", rid="grpc-abort-1",
                                             sampling_params=_sp(max_new_tokens=LONG)), timeout=60)
    first = next(call)
    assert first.rid == "grpc-abort-1"
    stub.Abort(pb2.AbortRequest(rid="grpc-abort-1"), timeout=10)
    rest = list(call)
    assert rest and rest[-1].finish_reason.type == pb2.FINISH_TYPE_ABORT
    assert rest[-1].usage.completion_tokens < LONG
    wait_idle(http)
    with pytest.raises(grpc.RpcError) as e:
        stub.Abort(pb2.AbortRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_client_cancel_frees_the_request(stub, http):
    # The 2000 tokens would finish by themselves within the 5 s below; LONG would not.
    call = stub.Generate(pb2.GenerateRequest(text="Go on forever",
                                             sampling_params=_sp(max_new_tokens=LONG)), timeout=120)
    got = [next(call) for _ in range(3)]
    assert all(not m.HasField("finish_reason") for m in got)
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    t0 = time.monotonic()
    gauges = wait_idle(http, timeout=5.0)     # anyserve:num_running_reqs 0, token_usage 0
    assert gauges["num_running_reqs"] == 0 and time.monotonic() - t0 < 5.0


GRPC_BAD = [
    (dict(sampling_params=_sp()), "prompt"),
    (dict(text="", sampling_params=_sp()), "empty"),
    (dict(text="Hi", sampling_params=_sp(temperature=-1.0)), "temperature"),
    (dict(text="Hi", sampling_params=_sp(top_p=0.0)), "top_p"),
    (dict(text="Hi", sampling_params=_sp(top_k=-5)), "top_k"),
    (dict(text="Hi", sampling_params=_sp(min_p=2.0)), "min_p"),
    (dict(text="Hi", sampling_params=_sp(max_new_tokens=-3)), "max_new_tokens"),
    (dict(text="Hi", sampling_params=_sp(n=0)), "n"),
    (dict(text="Hi", sampling_params=_sp(repetition_penalty=0.0)), "repetition_penalty"),
    (dict(text="Hi", sampling_params=_sp(presence_penalty=5.0)), "presence_penalty"),
    (dict(text="Hi", sampling_params=_sp(max_new_tokens=CONTEXT)), "context"),
    (dict(input_ids=pb2.TokenIds(ids=[10**8]), sampling_params=_sp()), "vocab"),
    (dict(input_ids=pb2.TokenIds(ids=[-4]), sampling_params=_sp()), "vocab"),
    (dict(input_ids=pb2.TokenIds(ids=[7] * (CONTEXT + 10)), sampling_params=_sp()), "context"),
    (dict(text="Hi", sampling_params=_sp(), top_logprobs_num=1000), "top_logprobs_num"),
    (dict(text="Hi", sampling_params=_sp(), top_logprobs_num=-1), "top_logprobs_num"),
    (dict(input_ids=pb2.TokenIds(ids=[5, 6, 7]), sampling_params=_sp(), return_logprob=True,
          logprob_start_len=-2), "logprob_start_len must be an integer >= -1"),
    (dict(input_ids=pb2.TokenIds(ids=[5, 6, 7]), sampling_params=_sp(), return_logprob=True,
          logprob_start_len=3), "logprob_start_len (3) is not less than the number of prompt tokens (3)"),
]


@pytest.mark.parametrize("fields,substring", GRPC_BAD, ids=[s[:24] for _, s in GRPC_BAD])
def test_grpc_bad_input_is_invalid_argument(stub, fields, substring):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb2.GenerateRequest(**fields), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert substring.lower() in e.value.details().lower(), e.value.details()
    _, ids = _collect(list(stub.Generate(pb2.GenerateRequest(text="Hi", sampling_params=_sp(max_new_tokens=2)),
                                         timeout=30)))
    assert len(ids) == 2
