"""aiter on ROCm without an AMD GPU: registered exactly where the aiter package is installed and
preferred over Triton on the hip platform; and the attention backend's page tables and arguments,
checked by a fake ``aiter`` (fake_aiter.py) whose two kernels follow aiter's documented semantics
in plain torch, against the torch backend on random paged inputs."""
from __future__ import annotations

import re
import sys

import pytest
import torch

import backends.rocm as rocm_backends
import backends.rocm.aiter_attention as aiter_attention
import hal
from attention_case import step_inputs
from backends.cpu.torch_attention import TorchAttentionBackend
from backends.cuda.platform import CudaPlatform
from backends.rocm.aiter_attention import AiterAttentionBackend, import_aiter
from backends.rocm.platform import RocmPlatform
from engine.runner.forward_batch import ForwardMode
from fake_aiter import CALLS, fake_aiter, hide_aiter
import fake_aiter as fake_aiter_module
from hal.graph_runner import attention_can_be_captured
from hal.registry import BackendSelectionError, entries
from test_torch_attention import CASES, NUM_KV_HEADS, make_setup


@pytest.fixture
def aiter(monkeypatch):
    yield from fake_aiter_module.install(monkeypatch)


@pytest.fixture
def registries(monkeypatch):
    monkeypatch.setattr(rocm_backends, "triton_available", lambda: True)
    yield from fake_aiter_module.isolated_registries(monkeypatch)


# -- registration and selection --------------------------------------------------------------------
def test_without_aiter_nothing_is_registered_and_rocm_takes_triton(registries, monkeypatch):
    hide_aiter(monkeypatch)
    assert rocm_backends.register_aiter() is False
    assert "aiter" not in entries("attention")
    entry, why = hal.select("attention", RocmPlatform())
    assert entry.name == "triton" and why == "platform preference"
    with pytest.raises(BackendSelectionError, match="--attention-backend aiter: unknown attention backend"):
        hal.select("attention", RocmPlatform(), "aiter")


def test_with_aiter_it_registers_on_rocm_only_and_is_preferred_there(registries, aiter):
    assert rocm_backends.register_aiter() is True
    assert entries("attention")["aiter"].platforms == {"hip"}
    rocm = RocmPlatform()
    entry, why = hal.select("attention", rocm)
    assert entry.name == "aiter" and why == "platform preference"
    # an explicit choice is still honoured
    entry, why = hal.select("attention", rocm, "triton")
    assert entry.name == "triton" and why == "requested"
    # other platforms never pick it, and asking for it there is a clear error
    assert hal.select("attention", CudaPlatform())[0].name != "aiter"
    assert hal.select("attention", hal.get_platform("cpu"))[0].name == "torch"
    with pytest.raises(BackendSelectionError, match=re.escape("--attention-backend aiter: does not run on cpu "
                                                              "(runs on hip)")):
        hal.select("attention", hal.get_platform("cpu"), "aiter")


def test_an_unusable_aiter_is_skipped_for_triton_and_a_clear_error_when_asked_for(registries, monkeypatch):
    """Installed, but without the functions the backend calls (an old or broken aiter)."""
    monkeypatch.setitem(sys.modules, "aiter", fake_aiter(paged_attention_ragged=None))
    assert rocm_backends.register_aiter() is True
    entry, why = hal.select("attention", RocmPlatform())
    assert entry.name == "triton" and why == "platform preference (aiter unavailable)"
    with pytest.raises(BackendSelectionError, match=re.escape("--attention-backend aiter: not available in this "
                                                              "install; install aiter (github.com/ROCm/aiter")):
        hal.select("attention", RocmPlatform(), "aiter")


def test_without_triton_aiter_is_not_available(registries, aiter, monkeypatch):
    """Triton runs what aiter cannot (captured decode, unsupported shapes), so both are needed."""
    monkeypatch.setattr(rocm_backends, "triton_available", lambda: False)
    rocm_backends.register_aiter()
    assert not entries("attention")["aiter"].available()


def test_missing_functions_and_broken_imports_are_clear_errors(monkeypatch, break_import):
    monkeypatch.setitem(sys.modules, "aiter", fake_aiter(mha_batch_prefill_func=None))
    with pytest.raises(RuntimeError, match=re.escape("this aiter has no aiter.mha_batch_prefill_func")):
        import_aiter()

    break_import("aiter", "libamdhip64.so: cannot open shared object file")
    with pytest.raises(RuntimeError, match=r"aiter is installed but failed to import \(ImportError: libamdhip64"):
        import_aiter()


def test_aiter_attention_offers_graph_capture():
    """It has reserve(), so choosing it keeps HIP graphs on (decode is then captured on Triton)."""
    assert attention_can_be_captured(AiterAttentionBackend)


# -- the wrapper against the torch backend ---------------------------------------------------------
class RecordingFallback(TorchAttentionBackend):
    """Stands in for the Triton backend (whose kernels need a GPU or Triton's interpreter)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.steps: list[ForwardMode] = []
        self.reserved: list[int] = []

    def reserve(self, max_batch_size: int) -> None:
        self.reserved.append(max_batch_size)

    def init_forward_metadata(self, batch) -> None:
        self.steps.append(batch.mode)
        super().init_forward_metadata(batch)


@pytest.fixture
def fallback(monkeypatch):
    made: list[RecordingFallback] = []

    def factory(**kw):
        made.append(RecordingFallback(**kw))
        return made[-1]

    monkeypatch.setattr(aiter_attention, "triton_fallback", factory)
    return made


def aiter_like(torch_backend: TorchAttentionBackend, **over) -> AiterAttentionBackend:
    kw = dict(num_q_heads=torch_backend.num_q_heads, num_kv_heads=torch_backend.num_kv_heads,
              head_dim=torch_backend.head_dim, kv_pool=torch_backend.kv_pool,
              req_to_token=torch_backend.req_to_token, page_size=torch_backend.page_size,
              dtype=torch_backend.dtype, device=torch_backend.device)
    kw.update(over)
    return AiterAttentionBackend(**kw)


def run_both(case, page_size, gqa, head_dim=64, dtype=torch.bfloat16, reserve=None, setup=None):
    """(aiter output, torch output, aiter backend, setup) for one step on the same pool, after
    checking that the aiter backend stored the new K/V at out_cache_loc. ``setup`` (from an earlier
    call) runs the step on that pool and those backends again."""
    mode, prefix_lens, ext_lens = CASES[case]
    if setup is None:
        ref_backend, pool, req_to_token, rows, g = make_setup(page_size, NUM_KV_HEADS * gqa, head_dim, dtype,
                                                              batch_size=len(prefix_lens))
        setup = (aiter_like(ref_backend), ref_backend, pool, req_to_token, rows, g)
    backend, ref_backend, pool, req_to_token, rows, g = setup
    if reserve:
        backend.reserve(reserve)
    batch, (q, k, v) = step_inputs(mode, req_to_token, rows, prefix_lens, ext_lens, NUM_KV_HEADS * gqa,
                                   NUM_KV_HEADS, head_dim, dtype, g)
    scaling = head_dim ** -0.5
    backend.init_forward_metadata(batch)
    out = backend.forward(q, k, v, 1, scaling, batch)
    loc = batch.out_cache_loc
    assert torch.equal(pool.k_buffers[1][loc], k) and torch.equal(pool.v_buffers[1][loc], v)
    ref_backend.init_forward_metadata(batch)
    ref = ref_backend.forward(q, k, v, 1, scaling, batch)
    assert out.shape == q.shape and out.dtype == dtype
    return out, ref, backend, setup


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("gqa", [1, 4])
def test_aiter_kernels_see_the_same_paged_kv_as_the_torch_backend(aiter, fallback, case, page_size, gqa):
    """Shuffled pages, request rows not 0..B-1, stale values in every other slot: a wrong page
    table, length or layout reads other keys and changes the output."""
    out, ref, *_ = run_both(case, page_size, gqa)
    assert CALLS == ["decode" if CASES[case][0].is_decode else "extend"] and not fallback
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_decode_longer_than_one_partition(aiter, fallback):
    """Contexts past 256 tokens need several partitions and a larger scratch. Positions past 64
    reuse the first page's slots (keeping each position's offset in its page): only the table
    matters here."""
    ref_backend, pool, req_to_token, rows, g = make_setup(16, 2 * NUM_KV_HEADS, 64, torch.bfloat16, batch_size=2)
    long_table = torch.zeros(req_to_token.shape[0], 600, dtype=torch.int32)
    long_table[:, :64] = req_to_token
    long_table[:, 64:] = req_to_token[:, :16].repeat(1, 34)[:, : 600 - 64]
    ref_backend.req_to_token = long_table
    backend = aiter_like(ref_backend)
    batch, (q, k, v) = step_inputs(ForwardMode.DECODE, long_table, rows, [520, 300], [1, 1], 2 * NUM_KV_HEADS,
                                   NUM_KV_HEADS, 64, torch.bfloat16, g)
    backend.init_forward_metadata(batch)
    assert backend._meta["max_num_partitions"] == 3
    out = backend.forward(q, k, v, 0, 0.125, batch)
    ref_backend.init_forward_metadata(batch)
    torch.testing.assert_close(out.float(), ref_backend.forward(q, k, v, 0, 0.125, batch).float(),
                               atol=2e-2, rtol=2e-2)


def test_float32_runs_on_triton(aiter, fallback):
    out, ref, backend, _ = run_both("extend_with_prefix", 16, 2, dtype=torch.float32)
    assert CALLS == [] and fallback[0].steps == [ForwardMode.EXTEND]
    assert "float16/bfloat16, not float32" in backend.extend_fallback_reason
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("page_size, head_dim, gqa, why", [
    (4, 64, 1, "page sizes (1, 16, 32), not 4"),
    (16, 96, 1, "head_dim (64, 128), not 96"),
])
def test_decode_shapes_aiter_lacks_run_on_triton_while_extend_stays_on_aiter(aiter, fallback, page_size,
                                                                             head_dim, gqa, why):
    out, ref, backend, setup = run_both("decode", page_size, gqa, head_dim=head_dim)
    assert why in backend.decode_fallback_reason and backend.extend_fallback_reason is None
    assert CALLS == [] and fallback[0].steps == [ForwardMode.DECODE]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out, ref, *_ = run_both("extend_with_prefix", page_size, gqa, head_dim=head_dim, setup=setup)
    assert CALLS == ["extend"] and fallback[0].steps == [ForwardMode.DECODE]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_after_reserve_decode_runs_on_triton_so_graphs_can_capture_it(aiter, fallback):
    out, ref, backend, setup = run_both("decode", 16, 2, reserve=48)
    assert fallback[0].reserved == [48] and fallback[0].steps == [ForwardMode.DECODE] and CALLS == []
    assert backend.decode_fallback_reason == "decode steps are captured in device graphs"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # extend is never captured and stays on aiter
    out, ref, *_ = run_both("extend_with_prefix", 16, 2, setup=setup)
    assert CALLS == ["extend"] and fallback[0].steps == [ForwardMode.DECODE]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_uneven_heads_are_a_clear_error(aiter):
    ref_backend, *_ = make_setup(1, 4, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape("num_q_heads (5) must be a multiple of num_kv_heads (2)")):
        aiter_like(ref_backend, num_q_heads=5)


def test_sliding_window_models_take_triton_on_rocm_and_asking_for_aiter_is_a_clear_error(registries, aiter):
    """aiter does not register the "sliding_window" feature: a model with windowed layers is served
    by Triton on the hip platform, and aiter asked for by name refuses at startup."""
    assert rocm_backends.register_aiter() is True
    needs = {"sliding_window": "the model's sliding-window layers (4096 on 32 of 32 layers)"}
    entry, why = hal.select("attention", RocmPlatform(), needs=needs)
    assert entry.name == "triton" and "aiter cannot do sliding_window" in why
    with pytest.raises(BackendSelectionError, match=re.escape("--attention-backend aiter: cannot do sliding_window "
                                                              "(asked for by the model's sliding-window layers")):
        hal.select("attention", RocmPlatform(), "aiter", needs=needs)
    ref_backend, *_ = make_setup(1, 4, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="--attention-backend aiter does not run sliding-window layers"):
        aiter_like(ref_backend, sliding_windows=(None, 4096))
