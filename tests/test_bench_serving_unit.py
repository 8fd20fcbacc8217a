"""`anyserve bench serving`: prompt sets, the metrics math, and whole runs against a tiny fake
server (FastAPI + uvicorn in a thread) streaming like /generate and the OpenAI endpoints."""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.bench.datasets import random_requests, shared_prefix_requests
from engine.bench.serving import (RequestResult, add_bench_serving_args, bench_serving_args, compute_metrics,
                                  fetch_cache_hit_rate, format_table, metric_value, run_bench_serving)

FIRST_TOKEN_DELAY_S = 0.03
TOKEN_DELAY_S = 0.01
MODEL = "fake-model"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Word-level tokenizer: "w0".."w99" are ids 3..102, so decode/encode round-trips exactly."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ---- the fake server --------------------------------------------------------------------------
class FakeState:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.fail_every = 0          # every k-th request answers 400
        self.in_flight = 0
        self.max_in_flight = 0


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _fake_app(tokenizer_dir: Path, state: FakeState) -> FastAPI:
    app = FastAPI()

    async def stream(num_tokens: int, chunk_for_step, final: list[Any]):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            for k in range(num_tokens):
                await asyncio.sleep(FIRST_TOKEN_DELAY_S if k == 0 else TOKEN_DELAY_S)
                yield _sse(chunk_for_step(k))
            for obj in final:
                yield _sse(obj)
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    def admit(body: dict) -> JSONResponse | None:
        state.bodies.append(body)
        if state.fail_every and len(state.bodies) % state.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=400)
        return None

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(tokenizer_dir), "tokenizer_path": str(tokenizer_dir), "is_generation": True}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        if (refused := admit(body)) is not None:
            return refused
        n, prompt_len = body["sampling_params"]["max_new_tokens"], len(body["input_ids"])

        def chunk(k: int) -> dict:     # cumulative, like SGLang's native API
            return {"text": "".join(f" w{i}" for i in range(k + 1)), "output_ids": list(range(3, k + 4)),
                    "meta_info": {"prompt_tokens": prompt_len, "completion_tokens": k + 1,
                                  "finish_reason": {"type": "length", "length": n} if k == n - 1 else None}}
        return StreamingResponse(stream(n, chunk, []), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        if (refused := admit(body)) is not None:
            return refused
        n = body["max_tokens"]
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
        return StreamingResponse(stream(n, lambda k: {"choices": [{"index": 0, "text": f" w{k}"}]},
                                        [{"choices": [], "usage": usage}]), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if (refused := admit(body)) is not None:
            return refused
        # No usage chunk: the client counts the output with the tokenizer.
        return StreamingResponse(stream(body["max_tokens"],
                                        lambda k: {"choices": [{"index": 0, "delta": {"content": f" w{k}"}}]}, []),
                                 media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("# HELP anyserve:cache_hit_rate Cached prompt tokens / prompt tokens\n"
                                 "# TYPE anyserve:cache_hit_rate gauge\n"
                                 'anyserve:cache_hit_rate{model_name="fake-model"} 0.375\n'
                                 "anyserve:num_requests_total 12.0\n")
    return app


@pytest.fixture(scope="module")
def fake_server(tokenizer_dir):
    state = FakeState()
    server = uvicorn.Server(uvicorn.Config(_fake_app(tokenizer_dir, state), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def server(fake_server):
    url, state = fake_server
    state.__init__()
    return url, state


def _args(url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serving_args(parser)
    return parser.parse_args(["--base-url", url, "--disable-tqdm", *extra])


# ---- datasets ---------------------------------------------------------------------------------
def test_random_prompts_have_lengths_in_range_and_round_trip(tokenizer):
    reqs = random_requests(tokenizer, 40, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    assert len(reqs) == 40
    assert all(10 <= r.prompt_len <= 20 and 5 <= r.output_len <= 10 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 1
    assert all(tokenizer.encode(r.prompt, add_special_tokens=False) == r.prompt_ids for r in reqs)
    assert not set(tokenizer.all_special_ids) & {t for r in reqs for t in r.prompt_ids}
    fixed = random_requests(tokenizer, 5, input_len=7, output_len=4, range_ratio=1.0, seed=3)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(7, 4)] * 5


def test_datasets_reproduce_with_seed(tokenizer):
    def prompts(seed):
        return [r.prompt_ids for r in random_requests(tokenizer, 5, 12, 4, 0.0, seed)]

    def gsp(seed):
        return [r.prompt_ids for r in shared_prefix_requests(tokenizer, 2, 3, 6, 4, 5, seed)]

    assert prompts(7) == prompts(7) and prompts(7) != prompts(8)
    assert gsp(7) == gsp(7) and gsp(7) != gsp(8)


def test_shared_prefix_groups_really_share_the_prefix(tokenizer):
    reqs = shared_prefix_requests(tokenizer, num_groups=3, prompts_per_group=4, system_prompt_len=12,
                                  question_len=5, output_len=6, seed=0)
    assert len(reqs) == 12 and all(r.prompt_len == 17 and r.output_len == 6 for r in reqs)
    groups: dict[tuple[int, ...], list] = {}
    for r in reqs:
        groups.setdefault(tuple(r.prompt_ids[:12]), []).append(r)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4]
    for prefix, members in groups.items():
        system_text = tokenizer.decode(list(prefix))
        assert all(r.prompt.startswith(system_text) for r in members)
        assert len({tuple(r.prompt_ids[12:]) for r in members}) == 4      # distinct questions
    order = [tuple(r.prompt_ids[:12]) for r in reqs]
    assert order != sorted(order, key=order.index)                         # groups interleave


@pytest.mark.parametrize("kwargs, flag", [({"input_len": 0}, "--random-input-len"),
                                          ({"range_ratio": 1.5}, "--random-range-ratio")])
def test_bad_dataset_arguments_name_the_flag(tokenizer, kwargs, flag):
    base = {"num_prompts": 2, "input_len": 4, "output_len": 4, "range_ratio": 0.0, "seed": 0}
    with pytest.raises(ValueError, match=flag):
        random_requests(tokenizer, **{**base, **kwargs})


# ---- metrics math -----------------------------------------------------------------------------
def test_metrics_math():
    ok = [RequestResult(success=True, prompt_len=10 * (i + 1), output_len=5, ttft=0.1 * (i + 1),
                        itl=[0.01 * (i + 1)] * 4, latency=0.2 * (i + 1)) for i in range(4)]
    m = compute_metrics(ok + [RequestResult(error="HTTP 500")], duration=2.0)
    assert (m["completed"], m["failed"]) == (4, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (100, 20)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["input_throughput"] == pytest.approx(50.0) and m["output_throughput"] == pytest.approx(10.0)
    assert m["concurrency"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.8) / 2.0)
    # TTFTs 100, 200, 300, 400 ms: linear-interpolated percentiles
    assert m["mean_ttft_ms"] == pytest.approx(250.0) and m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["p99_ttft_ms"] == pytest.approx(397.0) and m["p90_ttft_ms"] == pytest.approx(370.0)
    assert m["p99_e2e_latency_ms"] == pytest.approx(794.0)
    assert m["mean_itl_ms"] == pytest.approx(25.0) and m["median_itl_ms"] == pytest.approx(25.0)
    assert m["mean_tpot_ms"] == pytest.approx(62.5)        # mean of (latency - ttft) / (5 - 1) = 25, 50, 75, 100


def test_metrics_with_no_successes_are_zero_not_errors():
    m = compute_metrics([RequestResult(error="x")], duration=1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["mean_ttft_ms"] == 0.0


# ---- whole runs -------------------------------------------------------------------------------
def test_native_backend_run_measures_ttft_itl_and_exact_lengths(server, tmp_path, capsys):
    url, state = server
    out_file = tmp_path / "result.json"
    result = run_bench_serving(_args(url, "--backend", "anyserve", "--num-prompts", "6", "--random-input-len", "8",
                                     "--random-output-len", "5", "--random-range-ratio", "1.0",
                                     "--max-concurrency", "2", "--output-file", str(out_file)))
    assert (result["completed"], result["failed"]) == (6, 0)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (48, 30)
    assert result["mean_ttft_ms"] >= FIRST_TOKEN_DELAY_S * 1000
    assert result["median_itl_ms"] >= TOKEN_DELAY_S * 1000 * 0.5
    assert result["mean_e2e_latency_ms"] >= (FIRST_TOKEN_DELAY_S + 4 * TOKEN_DELAY_S) * 1000
    assert 0 < result["concurrency"] <= 2.0 + 1e-6
    assert state.max_in_flight <= 2
    measured = state.bodies[1:]                                      # the first is the warmup
    assert len(measured) == 6
    assert all(b["sampling_params"] == {"max_new_tokens": 5, "ignore_eos": True, "temperature": 0.0}
               and len(b["input_ids"]) == 8 and b["stream"] for b in measured)
    assert json.loads(out_file.read_text())["total_output_tokens"] == 30
    assert "Successful requests:" in capsys.readouterr().out


def test_openai_completions_run_on_shared_prefix_dataset(server):
    url, state = server
    result = run_bench_serving(_args(url, "--backend", "openai", "--dataset", "generated-shared-prefix",
                                     "--gsp-num-groups", "2", "--gsp-prompts-per-group", "3",
                                     "--gsp-system-prompt-len", "10", "--gsp-question-len", "4",
                                     "--gsp-output-len", "3", "--request-rate", "200"))
    assert (result["completed"], result["failed"], result["num_prompts"]) == (6, 0, 6)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (6 * 14, 6 * 3)
    assert result["model"] == MODEL
    assert all(b["ignore_eos"] and b["max_tokens"] == 3 and b["stream"] for b in state.bodies[1:])


def test_openai_chat_run_counts_output_with_tokenizer(server, tokenizer_dir):
    url, _ = server
    result = run_bench_serving(_args(url, "--backend", "openai-chat", "--model", MODEL, "--tokenizer",
                                     str(tokenizer_dir), "--num-prompts", "4", "--random-input-len", "6",
                                     "--random-output-len", "4", "--random-range-ratio", "1.0"))
    assert (result["completed"], result["total_output_tokens"]) == (4, 16)
    assert len([x for x in result["ttfts"] if x > 0]) == 4


def test_failed_requests_are_counted_not_raised(server):
    url, state = server
    state.fail_every = 3
    result = run_bench_serving(_args(url, "--num-prompts", "6", "--random-input-len", "4", "--random-output-len",
                                     "2", "--random-range-ratio", "1.0", "--warmup-requests", "0"))
    assert (result["completed"], result["failed"]) == (4, 2)
    assert result["total_output_tokens"] == 8
    (message, count), = result["errors"].items()
    assert count == 2 and "HTTP 400" in message and "injected failure" in message
    assert "Failed requests:" in format_table(result)


def test_programmatic_args_from_keywords(server):
    url, _ = server
    result = run_bench_serving(bench_serving_args(base_url=url, num_prompts=2, random_input_len=3,
                                                  random_output_len=2, random_range_ratio=1.0, disable_tqdm=True))
    assert (result["completed"], result["total_output_tokens"]) == (2, 4)
    with pytest.raises(TypeError, match="num_prompt"):
        bench_serving_args(num_prompt=3)


def test_failed_warmup_stops_with_a_clear_error(server):
    url, state = server
    state.fail_every = 1
    with pytest.raises(RuntimeError, match="warmup request .* failed: HTTP 400"):
        run_bench_serving(_args(url, "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2"))


def test_unreachable_server_says_what_to_do():
    with pytest.raises(RuntimeError, match="is the server running"):
        run_bench_serving(_args("http://127.0.0.1:9", "--num-prompts", "1"))


# ---- /metrics ---------------------------------------------------------------------------------
def test_fetch_cache_hit_rate(server):
    url, _ = server
    assert asyncio.run(fetch_cache_hit_rate(url)) == pytest.approx(0.375)


def test_metric_value_missing_metric_is_a_clear_error():
    with pytest.raises(KeyError, match="anyserve:cache_hit_rate"):
        metric_value("other_metric 1.0\n", "anyserve:cache_hit_rate")
