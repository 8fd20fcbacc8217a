"""--kv-cache-dtype fp8_e4m3 / fp8_e5m2: the KV pool in 8-bit floats. Greedy tokens identical to
transformers whose cache rounds K and V the same way (prefix-cache hits included), twice the
tokens in the same memory, the startup line, the flag's validation, attention backend selection
(only backends that read fp8 pools), and each vendor's variant of the formats."""
from __future__ import annotations

import random

import pytest
import torch

import hal
from backends.cpu.platform import CpuPlatform
from backends.cuda.platform import CudaPlatform
from backends.rocm.platform import RocmPlatform
from engine import Engine
from engine.mem_cache.kv_pool import KVPool, to_kv_dtype
from engine.server_args import ServerArgs
from hal.registry import _REGISTRY, BackendSelectionError, Entry
from hf_reference import hf_greedy, hf_model, kv_rounded_to

GREEDY = {"temperature": 0.0, "ignore_eos": True}
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
GiB = 1 << 30
N_TOKENS = 24


@pytest.mark.parametrize("kv", list(FP8))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_tokens_identical_to_transformers_with_the_same_kv_rounding(arch, kv, make_tiny):
    """A batch of mixed lengths, then prompts that extend a cached one (their prefix is read back
    from the fp8 pool, not recomputed)."""
    path = str(make_tiny(arch))
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (37, 5, 61)]
    followups = [prompts[0] + [rng.randrange(3, 1000) for _ in range(9)], prompts[2][:40]]
    params = {**GREEDY, "max_new_tokens": N_TOKENS}
    with Engine(model_path=path, device="cpu", dtype="float32", kv_cache_dtype=kv, page_size=4) as eng:
        runner = eng.scheduler.runner
        assert runner.kv_pool.dtype == FP8[kv] and runner.kv_pool.k_buffers[0].dtype == FP8[kv]
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        later = eng.generate(input_ids=followups, sampling_params=params)
        assert all(o["meta_info"]["cached_tokens"] >= 36 for o in later)
        eng.scheduler.check_memory_whole()
    hf = hf_model(path)
    with kv_rounded_to(FP8[kv]):
        expected = [hf_greedy(hf, p, N_TOKENS) for p in prompts + followups]
    assert [o["output_ids"] for o in outs + later] == expected
    # the rounding shows in the tokens: transformers with its plain fp32 cache decodes otherwise
    assert [hf_greedy(hf, p, N_TOKENS) for p in prompts + followups] != expected


def test_fp8_holds_twice_the_tokens_of_bf16_in_the_same_memory(llama_tiny, monkeypatch):
    monkeypatch.setattr(CpuPlatform, "memory_info", lambda self: (8 * GiB, 16 * GiB))
    seen = {}
    for kv in ("auto", "fp8_e4m3"):
        with Engine(model_path=str(llama_tiny), device="cpu", dtype="bfloat16", kv_cache_dtype=kv,
                    mem_fraction_static=0.0005) as eng:
            runner = eng.scheduler.runner
            seen[kv] = runner.max_total_tokens, runner.kv_bytes_per_token, runner.describe()
            # /get_server_info's scheduler_info says what the pool stores
            assert eng.scheduler.info.kv_cache_dtype == {"auto": "bfloat16", "fp8_e4m3": "float8_e4m3fn"}[kv]
    (tokens_bf16, bytes_bf16, _), (tokens_fp8, bytes_fp8, line) = seen["auto"], seen["fp8_e4m3"]
    assert bytes_bf16 == 2 * bytes_fp8
    assert tokens_fp8 == 2 * tokens_bf16 > 0
    # the startup line says what the cache stores
    assert f"kv_capacity={tokens_fp8} tokens" in line and "float8_e4m3fn" in line
    assert "bfloat16, page_size" in seen["auto"][2]


@pytest.mark.parametrize("dtype, limit", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0),
                                          (torch.float8_e4m3fnuz, 240.0), (torch.float8_e5m2fnuz, 57344.0)])
def test_the_pool_saturates_out_of_range_values(dtype, limit):
    """torch's own casts give the largest value, inf or NaN past the range, by variant."""
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=4, dtype=dtype, device=torch.device("cpu"),
                  num_pages=4, page_size=1)
    k = torch.tensor([[[1e5, -1e5, 3.0, -0.5]]], dtype=torch.float32)
    pool.set_kv(0, torch.tensor([2]), k, -k)
    assert pool.k_buffers[0][2, 0].float().tolist() == [limit, -limit, 3.0, -0.5]
    assert pool.v_buffers[0][2, 0].float().tolist() == [-limit, limit, -3.0, 0.5]
    assert KVPool.bytes_per_token(2, 3, 4, dtype) == 2 * 2 * 3 * 4
    assert to_kv_dtype(k, torch.bfloat16).dtype == torch.bfloat16   # other dtypes: a plain cast


def test_each_device_maps_the_flag_to_its_variant(monkeypatch):
    cpu = CpuPlatform()
    assert cpu.kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert cpu.kv_cache_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn
    assert cpu.kv_cache_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    # MI300 (CDNA3): the fnuz variants, as its fp8 kernels use
    assert RocmPlatform().kv_cache_dtype("fp8_e4m3", torch.bfloat16) == torch.float8_e4m3fnuz
    assert RocmPlatform().kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2fnuz
    # fp8: vLLM's name for e4m3, on every device
    assert cpu.kv_cache_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    assert RocmPlatform().kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fnuz
    with pytest.raises(ValueError, match="unknown"):
        cpu.kv_cache_dtype("fp8_e4m3fn", torch.float32)
    # NVIDIA: Triton converts e4m3 only from sm89 on
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability 8.9 or later .*sm_80: pass fp8_e5m2"):
        CudaPlatform().kv_cache_dtype("fp8_e4m3", torch.bfloat16)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 \\(e4m3\\) needs compute capability 8.9"):
        CudaPlatform().kv_cache_dtype("fp8", torch.bfloat16)
    assert CudaPlatform().kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert CudaPlatform().kv_cache_dtype("fp8_e4m3", torch.bfloat16) == torch.float8_e4m3fn


def test_the_flag_is_checked_and_explained():
    with pytest.raises(ValueError, match=r"--kv-cache-dtype must be one of \['auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'\]"):
        ServerArgs(kv_cache_dtype="fp8_e4m3fn")
    assert ServerArgs(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"]).kv_cache_dtype == "fp8_e5m2"
    assert "saturate" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


NEEDS = {"fp8_kv_cache": "--kv-cache-dtype fp8_e4m3"}


def test_selection_skips_attention_backends_that_cannot_read_fp8(monkeypatch):
    """A backend registered without the "fp8_kv_cache" feature (as FlashInfer and aiter are) is
    passed over for the next preference, and asking for it by name is a clear error."""
    monkeypatch.setitem(_REGISTRY["attention"], "nofp8", Entry("attention", "nofp8", object, frozenset({"cpu"}),
                                                               lambda: True))
    monkeypatch.setattr(CpuPlatform, "attention_preference", ("nofp8", "torch"))
    cpu = CpuPlatform()
    assert hal.select("attention", cpu)[0].name == "nofp8"
    entry, why = hal.select("attention", cpu, needs=NEEDS)
    assert entry.name == "torch"
    assert why == "platform preference (nofp8 cannot do fp8_kv_cache (asked for by --kv-cache-dtype fp8_e4m3))"
    with pytest.raises(BackendSelectionError, match=r"--attention-backend nofp8: cannot do fp8_kv_cache \(asked "
                                                     r"for by --kv-cache-dtype fp8_e4m3\); on cpu these can: torch$"):
        hal.select("attention", cpu, "nofp8", needs=NEEDS)
    assert hal.select("attention", cpu, "torch", needs=NEEDS)[0].name == "torch"


def test_the_portable_backends_read_fp8_and_flashinfer_does_not():
    from hal.registry import entries

    table = entries("attention")
    assert "fp8_kv_cache" in table["torch"].features and "fp8_kv_cache" in table["triton"].features
    if "flashinfer" in table:
        assert "fp8_kv_cache" not in table["flashinfer"].features
