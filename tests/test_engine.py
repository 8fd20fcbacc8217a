"""The offline Engine end to end on the CPU: scheduler, radix cache, retraction, against
transformers on the same checkpoint."""
import json
import random

import pytest

from engine import Engine
from hf_reference import hf_greedy as reference_greedy, hf_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


_HF_MODELS: dict = {}


def hf_greedy(model_path, prompt_ids, n_tokens):
    """transformers on the same checkpoint (fp32, loaded once per path)."""
    if model_path not in _HF_MODELS:
        _HF_MODELS[model_path] = hf_model(model_path)
    return reference_greedy(_HF_MODELS[model_path], prompt_ids, n_tokens)


def random_prompts(vocab, n, lo, hi, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def llama_engine(llama_tiny):
    eng = Engine(model_path=str(llama_tiny), device="cpu", dtype="float32")
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers_alone_and_batched(arch, make_tiny):
    path = str(make_tiny(arch))
    with Engine(model_path=path, device="cpu", dtype="float32") as eng:
        vocab = eng.scheduler.runner.vocab_size
        prompts = random_prompts(vocab, 16, 3, 60, seed=1)
        alone = eng.generate(input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": 32})
        assert alone["output_ids"] == hf_greedy(path, prompts[0], 32)
        outs = eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 32})
        for p, o in zip(prompts, outs):
            assert o["output_ids"] == hf_greedy(path, p, 32)
            assert o["meta_info"]["completion_tokens"] == 32
            assert o["meta_info"]["finish_reason"]["type"] == "length"
        eng.scheduler.check_memory_whole()


def test_shared_prefix_reports_cached_tokens(llama_tiny):
    path = str(llama_tiny)
    rng = random.Random(2)
    shared = [rng.randrange(3, 1000) for _ in range(120)]
    a, b = shared + [5, 6, 7], shared + [9, 10, 11, 12]
    params = {**GREEDY, "max_new_tokens": 12}
    with Engine(model_path=path, device="cpu", page_size=16) as eng:
        first = eng.generate(input_ids=a, sampling_params=params)
        second = eng.generate(input_ids=b, sampling_params=params)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 112  # 120 shared tokens, in whole pages of 16
    with Engine(model_path=path, device="cpu", page_size=16, disable_radix_cache=True) as eng:
        plain = eng.generate(input_ids=b, sampling_params=params)
    assert plain["meta_info"]["cached_tokens"] == 0
    assert plain["output_ids"] == second["output_ids"]


def test_small_pool_retracts_evicts_and_finishes_everything(llama_tiny):
    path = str(llama_tiny)
    prompts = random_prompts(1000, 64, 20, 60, seed=3)
    prompts[32:] = [prompts[i % 8][:30] + p[:10] for i, p in enumerate(prompts[32:])]  # shared prefixes
    params = {**GREEDY, "max_new_tokens": 40}
    with Engine(model_path=path, device="cpu") as big:
        expected = [o["output_ids"] for o in big.generate(input_ids=prompts, sampling_params=params)]
    with Engine(model_path=path, device="cpu", max_total_tokens=640, page_size=4,
                chunked_prefill_size=64) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        stats = eng.get_stats()
        assert [o["output_ids"] for o in outs] == expected
        assert stats.num_retractions > 0, "the pool was meant to be too small"
        assert stats.num_evicted_tokens > 0
        eng.scheduler.check_memory_whole()
        assert stats.available_tokens == stats.max_total_tokens


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_sizes_and_chunking_give_same_tokens(llama_tiny, page_size):
    path = str(llama_tiny)
    prompts = random_prompts(1000, 6, 40, 200, seed=4)
    params = {**GREEDY, "max_new_tokens": 16}
    expected = [hf_greedy(path, p, 16) for p in prompts]
    with Engine(model_path=path, device="cpu", page_size=page_size, chunked_prefill_size=48) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == expected
        eng.scheduler.check_memory_whole()


@pytest.mark.parametrize("policy", ["lpm", "fcfs", "dfs-weight", "lof", "random"])
def test_schedule_policies_finish_with_same_tokens(llama_tiny, policy):
    path = str(llama_tiny)
    prompts = random_prompts(1000, 12, 5, 40, seed=5)
    prompts += [prompts[0][:20] + [7] * k for k in range(1, 5)]
    params = {**GREEDY, "max_new_tokens": 8}
    with Engine(model_path=path, device="cpu", schedule_policy=policy) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [hf_greedy(path, p, 8) for p in prompts]


def test_seed_reproduces_alone_and_in_batch(llama_engine):
    params = {"temperature": 5.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    alone = llama_engine.generate("Once upon a time", params)["output_ids"]
    batch = llama_engine.generate(["Hello there", "Once upon a time", "The sea is"],
                                  [dict(params, seed=1), params, dict(params, seed=2)])
    assert batch[1]["output_ids"] == alone
    other = llama_engine.generate("Once upon a time", dict(params, seed=99))["output_ids"]
    assert other != alone


def test_top_k_one_equals_greedy(llama_engine):
    g = llama_engine.generate("The river", {**GREEDY, "max_new_tokens": 12})["output_ids"]
    k1 = llama_engine.generate("The river", {"temperature": 1.3, "top_k": 1, "max_new_tokens": 12,
                                             "ignore_eos": True})["output_ids"]
    assert g == k1


def test_n_samples_share_the_prompt(llama_engine):
    prompt = "A long shared prompt " * 20
    outs = llama_engine.generate(prompt, {"temperature": 5.0, "n": 4, "max_new_tokens": 8, "seed": 7,
                                          "ignore_eos": True})
    assert len(outs) == 4
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    assert sum(o["meta_info"]["cached_tokens"] > 0 for o in outs) >= 3


def test_stop_string_never_returned(llama_engine):
    free = llama_engine.generate("Tell me", {**GREEDY, "max_new_tokens": 24})
    text = free["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = llama_engine.generate("Tell me", {**GREEDY, "max_new_tokens": 24, "stop": [stop]})
    assert stop not in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert text.startswith(out["text"])
    chunks = list(llama_engine.generate("Tell me", {**GREEDY, "max_new_tokens": 24, "stop": stop},
                                        stream=True))
    assert all(stop not in c["text"] for c in chunks)
    assert chunks[-1]["text"] == out["text"]


def test_stop_token_ids_and_min_new_tokens(llama_engine):
    free = llama_engine.generate("Tell me", {**GREEDY, "max_new_tokens": 16})["output_ids"]
    tok = free[5]
    first = free.index(tok)
    out = llama_engine.generate("Tell me", {**GREEDY, "max_new_tokens": 16, "stop_token_ids": [tok]})
    assert out["output_ids"] == free[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    late = llama_engine.generate("Tell me", {"temperature": 0.0, "max_new_tokens": 16,
                                             "stop_token_ids": [tok], "min_new_tokens": 12})
    assert len(late["output_ids"]) >= 12 and tok not in late["output_ids"][:12]


def test_streaming_deltas_add_up(llama_engine):
    params = {**GREEDY, "max_new_tokens": 20}
    final = llama_engine.generate("Streaming works", params)
    chunks = list(llama_engine.generate("Streaming works", params, stream=True))
    assert len(chunks) > 1
    assert chunks[-1]["text"] == final["text"] and chunks[-1]["output_ids"] == final["output_ids"]
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    # (random weights emit invalid UTF-8 too: the held-back bytes show up only where the final
    # text has them; test_detokenizer checks the hold-back on valid text)
    assert all(final["text"].startswith(c["text"]) for c in chunks)


def test_stream_interval_sends_first_token_then_every_n(llama_engine, llama_tiny):
    """--stream-interval 4: the first token at once, then every 4 more, the rest with the finish
    (a reader that falls behind may get two of these together); the same tokens as without it."""
    params = {**GREEDY, "max_new_tokens": 10, "ignore_eos": True}
    final = llama_engine.generate("Streaming works", params)
    with Engine(model_path=str(llama_tiny), device="cpu", dtype="float32", stream_interval=4) as eng:
        chunks = list(eng.generate("Streaming works", params, stream=True))
    sizes = [len(c["output_ids"]) for c in chunks]
    assert len(sizes) >= 2 and sizes[-1] == 10 and all((n - 1) % 4 == 0 for n in sizes[:-1]), sizes
    assert chunks[-1]["output_ids"] == final["output_ids"] and chunks[-1]["text"] == final["text"]
    from engine.server_args import ServerArgs
    with pytest.raises(ValueError, match="--stream-interval must be >= 1, got 0"):
        ServerArgs(model_path=str(llama_tiny), stream_interval=0)


def test_logprobs_of_chosen_and_top_tokens(llama_engine):
    out = llama_engine.generate("Logprobs", {**GREEDY, "max_new_tokens": 6}, return_logprob=True,
                                top_logprobs_num=3)
    lps = out["meta_info"]["output_token_logprobs"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    for (lp, tok, _), top in zip(lps, tops):
        assert len(top) == 3 and top[0][1] == tok  # greedy: the chosen token is the top one
        assert abs(top[0][0] - lp) < 1e-5 and lp <= 0
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_async_generate(llama_engine):
    async def run():
        a = await llama_engine.async_generate("Async one", {**GREEDY, "max_new_tokens": 5})
        chunks = [c async for c in await llama_engine.async_generate("Async two", {**GREEDY, "max_new_tokens": 5},
                                                                       stream=True)]
        return a, chunks

    a, chunks = llama_engine.loop.run_until_complete(run())
    assert a["meta_info"]["completion_tokens"] == 5
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


BAD_INPUTS = [
    (dict(prompt=""), "empty"),
    (dict(input_ids=[1, 2, 10**7]), "vocabulary"),
    (dict(input_ids=[5] * 5000), "context"),
    (dict(prompt="hi", sampling_params={"temperature": -1}), "temperature"),
    (dict(prompt="hi", sampling_params={"top_p": 0}), "top_p"),
    (dict(prompt="hi", sampling_params={"max_new_tokens": -3}), "max_new_tokens"),
    (dict(prompt="hi", sampling_params={"n": 0}), "n"),
    (dict(prompt="hi", sampling_params={"top_k": -5}), "top_k"),
    (dict(prompt="hi", sampling_params={"stop_token_ids": [10**7]}), "stop_token_ids"),
    (dict(prompt="hi", sampling_params={"bogus": 1}), "bogus"),
    (dict(prompt="hi", sampling_params={"min_p": 2}), "min_p"),
    (dict(prompt="hi", sampling_params={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(prompt="a \ud800 b"), "surrogate"),
    (dict(prompt="hi", sampling_params={"stop": ["x\udfff"]}), "stop"),
    (dict(prompt="hi", sampling_params={"regex": "\ud800"}), "regex"),
]


@pytest.mark.parametrize("kwargs,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_names_the_field_and_engine_keeps_serving(llama_engine, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llama_engine.generate(**kwargs)
    ok = llama_engine.generate("still serving", {**GREEDY, "max_new_tokens": 3})
    assert ok["meta_info"]["completion_tokens"] == 3


def test_a_valid_surrogate_pair_is_text(llama_engine):
    emoji = json.loads('"\\ud83d\\ude00"')        # JSON's escape of U+1F600, as a client may send it
    out = llama_engine.generate(f"smile {emoji}", {**GREEDY, "max_new_tokens": 2, "stop": [emoji]})
    assert out["meta_info"]["completion_tokens"] >= 1


def test_a_request_the_scheduler_cannot_admit_is_aborted_and_the_loop_goes_on(llama_tiny):
    """Defence behind the front end's checks: an exception while admitting one request (here a stop
    string that cannot be encoded, slipped past validation) finishes that request, not the scheduler."""
    from engine.io_struct import TokenizedGenerateReq
    from engine.sampling.sampling_params import SamplingParams
    from engine.scheduler.scheduler import Scheduler
    from engine.server_args import ServerArgs
    from scheduler_harness import drive

    s = Scheduler(ServerArgs(model_path=str(llama_tiny), device="cpu", log_level="warning"))
    bad = SamplingParams.from_dict({"max_new_tokens": 4, "stop": ["ok"]})
    bad.stop = ["\ud800"]
    good = SamplingParams.from_dict({"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    done = drive(s, [TokenizedGenerateReq(rid="bad", input_ids=[5, 6, 7], sampling_params=bad),
                     TokenizedGenerateReq(rid="good", input_ids=[5, 6, 7], sampling_params=good)])
    assert done["bad"]["finish"]["type"] == "abort" and "UnicodeEncodeError" in done["bad"]["finish"]["message"]
    assert len(done["good"]["ids"]) == 4 and done["good"]["finish"]["type"] == "length"


def test_abort_frees_slots(llama_engine):
    eng = llama_engine

    async def run():
        tm = eng.tokenizer_manager
        from engine.io_struct import GenerateRequest

        gen = tm.generate(GenerateRequest(text="abort me " * 10, sampling_params={**GREEDY, "max_new_tokens": 500},
                                          stream=True, rid="to-abort"))
        await gen.__anext__()
        await gen.aclose()  # the caller goes away: the request is aborted
        for _ in range(200):
            stats = await tm.get_stats()
            if stats.num_running_reqs == 0 and stats.num_queue_reqs == 0:
                return stats
        raise AssertionError("request still running after abort")

    stats = eng.loop.run_until_complete(run())
    assert stats.num_running_reqs == 0
    eng.scheduler.check_memory_whole()


def test_shutdown_gives_the_model_and_pools_back(llama_tiny):
    """An offline Engine's shutdown drops the weights, KV pool and graphs (a second Engine in the
    same process must find the device free): nothing keeps them alive once it returns."""
    import gc
    import weakref

    engine = Engine(model_path=llama_tiny, device="cpu", dtype="float32")
    engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    runner = engine.scheduler.runner
    held = [weakref.ref(runner.model), weakref.ref(runner.kv_pool), weakref.ref(engine.scheduler)]
    del runner
    engine.shutdown()
    gc.collect()
    assert [r() for r in held] == [None, None, None]
    with pytest.raises(RuntimeError, match="shut down"):
        engine.scheduler
    engine.shutdown()                                                  # twice is harmless
