"""Decode steps as device graphs through the whole Engine: greedy tokens identical with graphs on and
off (fp32 and bf16) for batch sizes that need padding (3, 5, 17) and batches that shrink through
uncaptured sizes as requests finish; still identical after retractions (a pool too small for the
batch) and after aborts; and the graphs are really replayed."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

GREEDY = {"temperature": 0.0, "ignore_eos": True}
# graphs up to 16: a batch of 17 runs eagerly until one request finishes, then replays
ENGINE_KW = dict(device="cuda", max_total_tokens=1 << 14, page_size=16, cuda_graph_max_bs=16)


def prompts(n, seed, lo=3, hi=60, vocab=2000):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def params(n, seed, lo=8, hi=40):
    """Different lengths per request: the decode batch shrinks through uncaptured sizes."""
    rng = random.Random(seed)
    return [{**GREEDY, "max_new_tokens": rng.randint(lo, hi)} for _ in range(n)]


def count_replays(engine) -> list:
    """Wrap the runner's graph replay; the list grows by one batch size per replayed step."""
    runner = engine.scheduler.runner
    gr = runner.graph_runner
    assert gr is not None, runner.describe()
    calls: list[int] = []
    original = gr.replay

    def replay(batch):
        calls.append(batch.batch_size)
        return original(batch)

    gr.replay = replay
    return calls


def generate_all(engine, batches):
    return [[o["output_ids"] for o in engine.generate(input_ids=p, sampling_params=s)] for p, s in batches]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_on_and_off_give_identical_greedy_tokens(llama_tiny, dtype):
    from engine import Engine

    batches = [(prompts(n, seed=n), params(n, seed=n)) for n in (1, 3, 5, 17)]
    with Engine(model_path=str(llama_tiny), dtype=dtype, **ENGINE_KW) as eng:
        replays = count_replays(eng)
        with_graphs = generate_all(eng, batches)
    with Engine(model_path=str(llama_tiny), dtype=dtype, disable_cuda_graph=True, **ENGINE_KW) as eng:
        assert eng.scheduler.runner.graph_runner is None
        eager = generate_all(eng, batches)
    assert {3, 5, 1} <= set(replays), f"replayed batch sizes: {sorted(set(replays))}"
    assert max(replays) <= 16
    for n, (g, e) in enumerate(zip(with_graphs, eager)):
        assert g == e, f"batch {len(g)}: graphs on and off disagree"


def test_graphs_after_retraction(llama_tiny):
    """A pool too small for the batch: requests are retracted and come back; the graphs replay
    the shrunken and regrown batches correctly."""
    from engine import Engine

    ps, ss = prompts(24, seed=7, lo=30, hi=60), [{**GREEDY, "max_new_tokens": 48}] * 24
    small = dict(ENGINE_KW, max_total_tokens=1024, page_size=4, chunked_prefill_size=128)
    with Engine(model_path=str(llama_tiny), dtype="float32", **small) as eng:
        replays = count_replays(eng)
        with_graphs = [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=ss)]
        stats = eng.get_stats()
        eng.scheduler.check_memory_whole()
    assert stats.num_retractions > 0, "the pool was meant to be too small"
    assert replays
    with Engine(model_path=str(llama_tiny), dtype="float32", disable_cuda_graph=True, **ENGINE_KW) as eng:
        eager = [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=ss)]
    assert with_graphs == eager


def test_graphs_after_abort(llama_tiny):
    """Two of six streams go away mid-decode; the other four, and a batch after them, are right."""
    from engine import Engine
    from engine.io_struct import GenerateRequest

    ps = prompts(6, seed=11)
    ABORTED = (1, 4)
    later = prompts(3, seed=12)
    n_tokens = 40

    async def run(eng):
        tm = eng.tokenizer_manager

        async def collect(i):
            sp = {**GREEDY, "max_new_tokens": n_tokens}
            gen = tm.generate(GenerateRequest(input_ids=ps[i], sampling_params=sp, stream=True, rid=f"r{i}"))
            last = None
            while True:
                try:
                    last = await gen.__anext__()
                except StopAsyncIteration:
                    return last["output_ids"]
                if i in ABORTED and len(last["output_ids"]) >= 5:
                    await gen.aclose()        # the client goes away: the request is aborted
                    return None

        return await asyncio.gather(*(collect(i) for i in range(len(ps))))

    with Engine(model_path=str(llama_tiny), dtype="float32", **ENGINE_KW) as eng:
        replays = count_replays(eng)
        streamed = eng.loop.run_until_complete(run(eng))
        after = [o["output_ids"] for o in eng.generate(input_ids=later,
                                                        sampling_params={**GREEDY, "max_new_tokens": 20})]
        for _ in range(100):
            stats = eng.get_stats()
            if stats.num_running_reqs == 0:
                break
        eng.scheduler.check_memory_whole()
    assert [i for i, out in enumerate(streamed) if out is None] == list(ABORTED)
    assert replays
    keep = [i for i in range(len(ps)) if i not in ABORTED]
    with Engine(model_path=str(llama_tiny), dtype="float32", disable_cuda_graph=True, **ENGINE_KW) as eng:
        expected = [o["output_ids"] for o in eng.generate(input_ids=[ps[i] for i in keep],
                                                           sampling_params={**GREEDY, "max_new_tokens": n_tokens})]
        expected_after = [o["output_ids"] for o in eng.generate(input_ids=later,
                                                                 sampling_params={**GREEDY, "max_new_tokens": 20})]
    assert [streamed[i] for i in keep] == expected
    assert after == expected_after
