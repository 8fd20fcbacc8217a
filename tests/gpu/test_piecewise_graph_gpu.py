"""--enable-piecewise-cuda-graph on the GPU: extend steps replayed as captured pieces with the
attention eager between them give transformers' greedy tokens in fp32 (prompt chunks and mixed
steps, token counts padded to captured ones, longer steps eager), the eager run's tokens in bf16,
and the eager step's logits for one extend batch at several sizes."""
from __future__ import annotations

import pytest
import torch
from test_engine_gpu import BF16_LOGIT_TOL, ENGINE_KW, GREEDY, hf_model, prompts
from hf_reference import hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

PIECEWISE = dict(enable_piecewise_cuda_graph=True, piecewise_cuda_graph_max_tokens=96)


@pytest.mark.parametrize("mixed", [False, True])
def test_piecewise_greedy_tokens_identical_to_transformers(llama_tiny, mixed):
    from engine import Engine

    batch = prompts(12, 5, 150, seed=9)
    kw = dict(enable_mixed_chunk=True, schedule_policy="lof") if mixed else {}
    # every extend step fits (128-token chunks, 4 decoding rows), but for the padding
    with Engine(model_path=str(llama_tiny), dtype="float32", max_running_requests=4, chunked_prefill_size=128,
                enable_piecewise_cuda_graph=True, piecewise_cuda_graph_max_tokens=160, **kw, **ENGINE_KW) as eng:
        runner = eng.scheduler.runner
        assert runner.piecewise_runner is not None and "piecewise_graphs=cuda_piecewise" in runner.describe()
        outs = eng.generate(input_ids=batch, sampling_params=[{**GREEDY, "max_new_tokens": 8 + i}
                                                              for i in range(len(batch))])
        assert runner.piecewise_runner.replays > 3, "no extend step went through the pieces"
        assert not mixed or eng.scheduler.clock.totals.mixed_decode_tokens > 0
        eng.scheduler.check_memory_whole()
    hf = hf_model(llama_tiny, torch.float32)
    assert [o["output_ids"] for o in outs] == [hf_greedy(hf, p, 8 + i) for i, p in enumerate(batch)]


def test_piecewise_bf16_tokens_equal_eager(llama_tiny):
    from engine import Engine

    batch = prompts(10, 5, 200, seed=10)
    params = {**GREEDY, "max_new_tokens": 24}
    runs = []
    for extra in ({}, PIECEWISE):
        with Engine(model_path=str(llama_tiny), dtype="bfloat16", enable_mixed_chunk=True, max_running_requests=5,
                    chunked_prefill_size=64, **extra, **ENGINE_KW) as eng:
            runs.append([o["output_ids"] for o in eng.generate(input_ids=batch, sampling_params=params)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piecewise_logits_equal_eager_at_several_sizes(llama_tiny, dtype):
    """One runner: each prompt's prefill step through the pieces (padded), then again eagerly on a
    fresh KV slice; the logits agree to the dtype's rounding of a different padding of the GEMMs."""
    from engine import Engine

    with Engine(model_path=str(llama_tiny), dtype=str(dtype).replace("torch.", ""), **PIECEWISE,
                **ENGINE_KW) as eng:
        runner = eng.scheduler.runner
        pw = runner.piecewise_runner
        for n in (2, 7, 33, 96):
            ids = prompts(1, n, n, seed=n)[0]
            eng.flush_cache()
            piece = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 1},
                                 return_logprob=True, logprob_start_len=0)
            before = pw.replays
            runner.piecewise_runner = None
            eng.flush_cache()
            eager = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 1},
                                 return_logprob=True, logprob_start_len=0)
            runner.piecewise_runner = pw
            assert pw.replays == before and before > 0
            a = [lp for lp, *_ in piece["meta_info"]["input_token_logprobs"][1:]]
            b = [lp for lp, *_ in eager["meta_info"]["input_token_logprobs"][1:]]
            # bf16: another padding picks other GEMM tiles, so other roundings (as against transformers)
            tol = (1e-5 if dtype == torch.float32 else BF16_LOGIT_TOL) * max(map(abs, b))
            assert a == pytest.approx(b, abs=tol), n
