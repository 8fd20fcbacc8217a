"""The gRPC front end against a fake TokenizerManager: streaming, n > 1, health, model info,
abort, client cancellation, error statuses, API key, and stub generation from the .proto."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from engine.entrypoints.grpc import codegen
from engine.entrypoints.grpc.server import pb2, pb2_grpc, start_grpc_server
from engine.server_args import ServerArgs
from fake_tokenizer_manager import CRASH_MARKER, EOS_ID, REPLY, FakeTokenizerManager, prompt_logprob

API_KEY = "sekret"


class _LoopThread:
    """An event loop in a daemon thread: the servers live there, tests use blocking stubs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Served:
    def __init__(self, loop: _LoopThread, api_key: str | None = None):
        self.tm = FakeTokenizerManager(token_delay=0.002, server_args=ServerArgs(
            model_path="/models/fake-model", served_model_name="fake-model", device="cpu", api_key=api_key))
        port = _free_port()
        self.server = loop.run(start_grpc_server(self.tm, self.tm.server_args, port))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb2_grpc.AnyserveStub(self.channel)


@pytest.fixture(scope="module")
def loop():
    lt = _LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def served(loop):
    s = _Served(loop)
    yield s
    s.channel.close()
    loop.run(s.server.stop(0))


@pytest.fixture(scope="module")
def served_with_key(loop):
    s = _Served(loop, api_key=API_KEY)
    yield s
    s.channel.close()
    loop.run(s.server.stop(0))


def _request(**kw: Any) -> Any:
    params = kw.pop("params", {})
    ids = kw.pop("input_ids", None)
    if ids is not None:
        kw["input_ids"] = pb2.TokenIds(ids=ids)
    return pb2.GenerateRequest(sampling_params=pb2.SamplingParams(**params), **kw)


def _reply_ids(n: int, seed: int = 0) -> list[int]:
    """The fake's first n tokens for a seed: REPLY rotated by the seed, one character a token."""
    shift = seed % len(REPLY)
    return [ord(c) for c in (REPLY[shift:] + REPLY[:shift])[:n]]


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ---- Generate ---------------------------------------------------------------------------------
def test_generate_streams_text_prompt_deltas(served):
    msgs = list(served.stub.Generate(_request(text="ab", rid="text-1", params={"max_new_tokens": 5})))
    assert [t for m in msgs for t in m.token_ids] == _reply_ids(5)
    assert "".join(m.text for m in msgs) == REPLY[:5]
    assert sum(1 for m in msgs if m.token_ids) == 5                   # one message per step
    assert all(m.rid == "text-1" and m.index == 0 for m in msgs)
    assert all(not m.HasField("finish_reason") for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason.type == pb2.FINISH_TYPE_LENGTH and last.finish_reason.length == 5
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 5)


def test_generate_token_ids_prompt_stops_on_string_never_returned(served):
    msgs = list(served.stub.Generate(_request(input_ids=[3, 5], params={"max_new_tokens": 20, "stop": ["quick"]})))
    text = "".join(m.text for m in msgs)
    assert text == "The "
    assert msgs[-1].finish_reason.type == pb2.FINISH_TYPE_STOP
    assert msgs[-1].finish_reason.matched_text == "quick"


def test_generate_stop_token_id_and_eos_report_matched_id(served):
    msgs = list(served.stub.Generate(_request(input_ids=[3], params={"max_new_tokens": 10,
                                                                     "stop_token_ids": [ord("q")]})))
    assert [t for m in msgs for t in m.token_ids] == _reply_ids(5)
    assert msgs[-1].finish_reason.WhichOneof("matched") == "matched_token_id"
    assert msgs[-1].finish_reason.matched_token_id == ord("q")
    msgs = list(served.stub.Generate(_request(input_ids=[3], params={"max_new_tokens": 100})))
    assert msgs[-1].finish_reason.type == pb2.FINISH_TYPE_STOP
    assert msgs[-1].finish_reason.matched_token_id == EOS_ID
    assert msgs[-1].usage.completion_tokens == len(REPLY)


def test_unset_sampling_fields_keep_engine_defaults_and_zero_is_forwarded(served):
    list(served.stub.Generate(_request(input_ids=[3], rid="defaults", params={"max_new_tokens": 2})))
    list(served.stub.Generate(_request(input_ids=[3], rid="zeros", params={
        "max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "ignore_eos": True, "regex": "a+"})))
    by_rid = {r.rid: r.sampling_params for r in served.tm.requests}
    assert by_rid["defaults"] == {"max_new_tokens": 2}
    assert by_rid["zeros"] == {"max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "ignore_eos": True,
                               "regex": "a+"}


def test_generate_returns_logprobs_per_new_token(served):
    msgs = list(served.stub.Generate(_request(input_ids=[3], return_logprob=True, top_logprobs_num=2,
                                              params={"max_new_tokens": 3})))
    for m in msgs:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
        assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token_id == lp.token_id for lp in m.logprobs)
    assert [lp.text for m in msgs for lp in m.logprobs] == list(REPLY[:3])


def test_prompt_logprobs_come_once_in_the_first_message(served):
    prompt = [3, 5, 7, 9]
    msgs = list(served.stub.Generate(_request(input_ids=prompt, rid="prompt-lp", return_logprob=True,
                                              top_logprobs_num=2, logprob_start_len=0,
                                              params={"max_new_tokens": 3})))
    assert next(r for r in served.tm.requests if r.rid == "prompt-lp").logprob_start_len == 0
    first = msgs[0].input_logprobs
    assert [e.token_id for e in first] == prompt
    assert not first[0].HasField("logprob") and not first[0].top_logprobs     # nothing precedes it
    assert [e.logprob for e in first[1:]] == pytest.approx([prompt_logprob(p) for p in (1, 2, 3)])
    assert all(e.HasField("logprob") and [t.token_id for t in e.top_logprobs] == [e.token_id, e.token_id + 1]
               for e in first[1:])
    assert all(not m.input_logprobs for m in msgs[1:])
    assert all(lp.HasField("logprob") for m in msgs for lp in m.logprobs)


def test_unset_logprob_start_len_is_the_last_prompt_token_as_on_http(served):
    msgs = list(served.stub.Generate(_request(input_ids=[3, 5, 7], rid="prompt-lp-default", return_logprob=True,
                                              params={"max_new_tokens": 2})))
    assert next(r for r in served.tm.requests if r.rid == "prompt-lp-default").logprob_start_len == -1
    assert [(e.token_id, e.logprob) for e in msgs[0].input_logprobs] == [(7, pytest.approx(prompt_logprob(2)))]
    without = list(served.stub.Generate(_request(input_ids=[3, 5, 7], logprob_start_len=0,
                                                 params={"max_new_tokens": 2})))
    assert all(not m.input_logprobs and not m.logprobs for m in without)     # only with return_logprob


def test_prompt_only_request_sends_its_prompt_logprobs_with_the_finish(served):
    msgs = list(served.stub.Generate(_request(input_ids=[3, 5], return_logprob=True, logprob_start_len=1,
                                              params={"max_new_tokens": 0})))
    assert len(msgs) == 1 and msgs[0].finish_reason.type == pb2.FINISH_TYPE_LENGTH
    assert [(e.token_id, e.logprob) for e in msgs[0].input_logprobs] == [(5, pytest.approx(prompt_logprob(1)))]


def test_n_samples_interleave_tagged_by_index_with_seed_offsets(served):
    msgs = list(served.stub.Generate(_request(input_ids=[10], rid="fan", params={
        "max_new_tokens": 6, "n": 2, "seed": 5})))
    indexes = [m.index for m in msgs]
    for i in (0, 1):
        assert [t for m in msgs if m.index == i for t in m.token_ids] == _reply_ids(6, seed=5 + i)
        assert [m for m in msgs if m.index == i][-1].finish_reason.type == pb2.FINISH_TYPE_LENGTH
    assert indexes.index(1) < len(indexes) - 1 - indexes[::-1].index(0)    # interleaved, not sequential
    seen = {r.rid: r.sampling_params for r in served.tm.requests if r.rid.startswith("fan-")}
    assert seen == {"fan-0": {"max_new_tokens": 6, "seed": 5}, "fan-1": {"max_new_tokens": 6, "seed": 6}}


def test_cached_tokens_reported_in_usage(served):
    list(served.stub.Generate(_request(input_ids=[7, 8, 9], params={"max_new_tokens": 1})))
    msgs = list(served.stub.Generate(_request(input_ids=[7, 8, 9], params={"max_new_tokens": 1})))
    assert msgs[-1].usage.cached_tokens == 2


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("request_kwargs, words", [
    ({"text": "", "params": {"max_new_tokens": 2}}, "empty"),
    ({"params": {"max_new_tokens": 2}}, "prompt"),
    ({"input_ids": [3, 5000]}, "vocabulary"),
    ({"text": "a", "params": {"temperature": -1.0}}, "temperature"),
    ({"text": "a", "params": {"n": 0}}, "n must be"),
    ({"text": "a", "params": {"max_new_tokens": 10_000}}, "context"),
    ({"input_ids": [3, 5], "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len must be"),
    ({"input_ids": [3, 5], "return_logprob": True, "logprob_start_len": 2}, "logprob_start_len (2) is not less"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(served, request_kwargs, words):
    with pytest.raises(grpc.RpcError) as info:
        list(served.stub.Generate(_request(**request_kwargs)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert list(served.stub.Generate(_request(text="ok", params={"max_new_tokens": 1})))[-1].usage.completion_tokens == 1


def test_internal_error_is_internal_and_server_keeps_serving(served):
    with pytest.raises(grpc.RpcError) as info:
        list(served.stub.Generate(_request(text=CRASH_MARKER)))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "fake crash" in info.value.details()
    assert served.stub.Health(pb2.HealthRequest()).serving


def test_dead_scheduler_is_unavailable(served):
    served.tm.alive = False
    try:
        for call in (lambda: served.stub.Health(pb2.HealthRequest()),
                     lambda: list(served.stub.Generate(_request(text="a")))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "restart" in info.value.details()
    finally:
        served.tm.alive = True


# ---- health, model info, abort, cancellation --------------------------------------------------------
def test_health_with_and_without_generation(served):
    assert served.stub.Health(pb2.HealthRequest()).serving
    before = len(served.tm.requests)
    assert served.stub.Health(pb2.HealthRequest(check_generate=True)).serving
    assert served.tm.requests[before].sampling_params["max_new_tokens"] == 1


def test_get_model_info(served):
    info = served.stub.GetModelInfo(pb2.GetModelInfoRequest())
    assert (info.model_path, info.tokenizer_path, info.served_model_name) == (
        "/models/fake-model", "/models/fake-model", "fake-model")
    assert (info.context_length, info.vocab_size, info.is_generation) == (256, 1000, True)
    assert (info.device, info.max_total_tokens, info.max_running_requests) == ("cpu", 4096, 16)


def _long_request(rid: str, n: int = 1) -> Any:
    return _request(input_ids=[3], rid=rid, params={"max_new_tokens": 200, "ignore_eos": True, "n": n})


def test_abort_by_rid_ends_every_sample_with_abort(served):
    call = served.stub.Generate(_long_request("stop-me", n=2))
    next(call)
    served.stub.Abort(pb2.AbortRequest(rid="stop-me"))
    finals = [m for m in call if m.HasField("finish_reason")]
    assert sorted(m.index for m in finals) == [0, 1]
    assert all(m.finish_reason.type == pb2.FINISH_TYPE_ABORT for m in finals)
    assert {("stop-me-0", "abort_request"), ("stop-me-1", "abort_request")} <= set(served.tm.aborts)


def test_abort_without_rid_is_invalid_argument(served):
    with pytest.raises(grpc.RpcError) as info:
        served.stub.Abort(pb2.AbortRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_cancel_aborts_request_in_tokenizer_manager(served):
    call = served.stub.Generate(_long_request("gone", n=2))
    next(call)
    call.cancel()
    assert _wait_for(lambda: {"gone-0", "gone-1"} <= set(served.tm.consumer_gone()))
    assert _wait_for(lambda: not served.tm.running & {"gone-0", "gone-1"})


def test_duplicate_running_rid_is_invalid_argument(served):
    call = served.stub.Generate(_long_request("twice"))
    next(call)
    with pytest.raises(grpc.RpcError) as info:
        list(served.stub.Generate(_request(input_ids=[3], rid="twice")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already running" in info.value.details()
    call.cancel()


# ---- API key ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)])
def test_api_key_required(served_with_key, metadata):
    stub = served_with_key.stub
    for call in (lambda: stub.GetModelInfo(pb2.GetModelInfoRequest(), metadata=metadata),
                 lambda: list(stub.Generate(_request(text="a", params={"max_new_tokens": 1}), metadata=metadata))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "--api-key" in info.value.details()


def test_api_key_accepted(served_with_key):
    md = (("authorization", f"Bearer {API_KEY}"),)
    stub = served_with_key.stub
    assert stub.GetModelInfo(pb2.GetModelInfoRequest(), metadata=md).served_model_name == "fake-model"
    msgs = list(stub.Generate(_request(text="a", params={"max_new_tokens": 2}), metadata=md))
    assert [t for m in msgs for t in m.token_ids] == _reply_ids(2)


# ---- codegen ----------------------------------------------------------------------------------
def test_codegen_regenerates_only_when_proto_changes(tmp_path):
    proto = tmp_path / "src" / "anyserve.proto"
    proto.parent.mkdir()
    shutil.copy(codegen.PROTO_PATH, proto)
    root = tmp_path / "cache"
    first = codegen.generate(proto, root)
    assert (first / "anyserve_pb2.py").is_file() and (first / "anyserve_pb2_grpc.py").is_file()
    stamp = (first / "anyserve_pb2.py").stat().st_mtime_ns
    assert codegen.generate(proto, root) == first
    assert (first / "anyserve_pb2.py").stat().st_mtime_ns == stamp           # cached, not rerun

    proto.write_text(proto.read_text().replace("message AbortResponse {}",
                                               "message AbortResponse {\n  bool found_it = 1;\n}"))
    second = codegen.generate(proto, root)
    assert second != first
    assert _abort_response_fields(second) == ["found_it"]
    assert _abort_response_fields(first) == []
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name])   # no temp dirs left


def _abort_response_fields(folder: Path) -> list[str]:
    # A fresh interpreter: this one already registered anyserve.proto in protobuf's pool.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import anyserve_pb2; "
            "print(','.join(anyserve_pb2.AbortResponse.DESCRIPTOR.fields_by_name))")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return [f for f in done.stdout.strip().split(",") if f]


def test_codegen_concurrent_writers_agree(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(codegen.generate(codegen.PROTO_PATH, tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (results[0] / "anyserve_pb2.py").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_codegen_reports_protoc_errors(tmp_path):
    bad = tmp_path / "broken.proto"
    bad.write_text('syntax = "proto3";\nmessage Oops { int32 = 1; }\n')
    with pytest.raises(RuntimeError, match="protoc failed on .*broken.proto"):
        codegen.generate(bad, tmp_path / "cache")
