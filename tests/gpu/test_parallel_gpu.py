"""On the GPU: the overlap scheduler gives the plain loop's tokens, and tensor parallelism over
NCCL (2 GPUs) gives one GPU's greedy tokens, with device graphs and the overlap scheduler on."""
from __future__ import annotations

import pytest
import torch
from test_overlap import _run, _scheduler, _stop_id, _workload
from test_tp import _generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]
CUDA_KW = dict(device="cuda", max_total_tokens=1 << 14, page_size=16)


def test_overlap_equals_plain_loop_on_gpu(llama_tiny):
    plain = _scheduler(llama_tiny, overlap=False, **CUDA_KW)
    assert _scheduler(llama_tiny, overlap=True, **CUDA_KW).overlap is not None
    stop_id = _stop_id(llama_tiny, **CUDA_KW)
    want = _run(plain, _workload(stop_id))
    s = _scheduler(llama_tiny, overlap=True, **CUDA_KW)
    got = _run(s, _workload(stop_id))
    assert {k: (v["ids"], v["finish"]) for k, v in got.items()} == {k: (v["ids"], v["finish"]) for k, v in want.items()}
    assert s.num_overlapped_steps >= 3


def test_overlap_is_on_by_default_on_gpu(llama_tiny):
    from engine.server_args import ServerArgs
    from engine.scheduler.scheduler import Scheduler

    s = Scheduler(ServerArgs(model_path=str(llama_tiny), log_level="warning", **CUDA_KW))
    assert s.overlap


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"), ("llama", "bfloat16")])
def test_tp2_greedy_tokens_equal_tp1_on_gpus(make_tiny, arch, dtype):
    path = make_tiny(arch, num_shards=2, dtype=dtype)
    kw = dict(device="cuda", page_size=16)
    one = _generate(path, 1, **kw)
    two = _generate(path, 2, **kw)
    if dtype == "float32":
        assert two == one
    else:   # bf16 partial sums are added in another order: allow late divergence only
        for k in one:
            n = next((i for i, (a, b) in enumerate(zip(one[k], two[k])) if a != b), len(one[k]))
            assert n >= 16, (k, n)
