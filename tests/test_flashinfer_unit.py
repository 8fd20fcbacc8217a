"""FlashInfer on CUDA without a GPU: registered exactly where the flashinfer package is installed,
a clear error when asked for without it, the attention backend's own checks that run before it
touches the package or the device, and the page table it builds from req_to_token."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import backends.cuda as cuda_backends
import hal
import hal.registry as registry
from backends.cuda.flashinfer_attention import FlashInferAttentionBackend, host_page_table
from hal.attention import page_indices
from backends.cuda.platform import CudaPlatform
from backends.triton.attention_backend import TritonAttentionBackend
from hal.graph_runner import attention_can_be_captured
from hal.registry import BackendSelectionError, entries

ROLES = ("attention", "sampling")


@pytest.fixture
def registries(monkeypatch):
    """The attention and sampling registries as they are now, restored after the test; the
    FlashInfer entries (if this machine has the package) removed."""
    entries("attention")   # load every backend first
    for role in ROLES:
        table = {name: e for name, e in registry._REGISTRY[role].items() if name != "flashinfer"}
        monkeypatch.setitem(registry._REGISTRY, role, table)


def pretend_installed(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kw):
        if name == "flashinfer":
            return real("json") if installed else None   # any spec stands for "found"
        return real(name, *args, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_registered_exactly_when_the_package_is_installed():
    installed = importlib.util.find_spec("flashinfer") is not None
    for role in ROLES:
        assert ("flashinfer" in entries(role)) == installed


def test_without_the_package_asking_for_flashinfer_is_a_clear_error(registries, monkeypatch):
    pretend_installed(monkeypatch, False)
    assert cuda_backends.register_flashinfer() is False
    cuda = CudaPlatform()
    for role in ROLES:
        assert "flashinfer" not in entries(role)
        known = ", ".join(sorted(entries(role)))
        flag = f"--{role}-backend flashinfer"
        with pytest.raises(BackendSelectionError,
                           match=re.escape(f"{flag}: unknown {role} backend; registered: {known}")):
            hal.select(role, cuda, "flashinfer")
    # the platform prefers flashinfer, and without it quietly takes the next name
    assert hal.select("attention", cuda)[0].name != "flashinfer"


def test_with_the_package_both_roles_register_on_cuda_only(registries, monkeypatch):
    pretend_installed(monkeypatch, True)
    assert cuda_backends.register_flashinfer() is True
    cuda = CudaPlatform()
    for role in ROLES:
        assert entries(role)["flashinfer"].platforms == {"cuda"}
        entry, why = hal.select(role, cuda, "flashinfer")
        assert entry.name == "flashinfer" and why == "requested"
        flag = f"--{role}-backend flashinfer"
        with pytest.raises(BackendSelectionError, match=re.escape(f"{flag}: does not run on cpu (runs on cuda)")):
            hal.select(role, hal.get_platform("cpu"), "flashinfer")
    # CUDA's attention preference puts it first; sampling stays on torch unless asked for
    assert hal.select("attention", cuda)[0].name == "triton"   # graphs first; flashinfer on request
    assert hal.select("sampling", cuda)[0].name == "torch"


def test_both_attention_backends_can_be_captured_in_device_graphs():
    assert attention_can_be_captured(FlashInferAttentionBackend)
    assert attention_can_be_captured(TritonAttentionBackend)


class FakeWrapper:
    """Records what the backend asks of FlashInfer's wrappers."""

    def __init__(self, workspace, layout, use_cuda_graph=False, paged_kv_indptr_buffer=None,
                 paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None, **kw):
        self.graph = use_cuda_graph
        self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)
        self.plans: list[tuple] = []
        self.window_lefts: list[int] = []
        self.runs = 0

    def plan(self, indptr, indices, last_page_len, *args, **kw):
        self.plans.append((indptr.tolist(), indices.tolist(), last_page_len.tolist()))
        self.window_lefts.append(kw.get("window_left", -1))

    def run(self, q, kv_cache, q_scale=None, out=None):
        self.runs += 1
        return out


class FakeEvent:
    log: list[str] = []

    def record(self):
        FakeEvent.log.append("record")

    def synchronize(self):
        FakeEvent.log.append("synchronize")


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("flashinfer")
    mod.__version__ = "fake"
    mod.BatchDecodeWithPagedKVCacheWrapper = mod.BatchPrefillWithPagedKVCacheWrapper = FakeWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.log = []
    return mod


def test_captured_decode_has_one_wrapper_per_size_over_fixed_buffers(fake_flashinfer):
    """begin_graph_capture plans a wrapper of that size outside the capture (init_forward_metadata
    inside it plans nothing); each replay plans that wrapper with the batch's own lengths, after
    the previous plan's copy left the pinned buffer."""
    from engine.runner.forward_batch import ForwardBatch, ForwardMode

    class Pool:
        capacity = 64

    page = 4
    req_to_token = torch.arange(8 * 32, dtype=torch.int32).view(8, 32)   # row r, position i -> 32r + i
    backend = FlashInferAttentionBackend(**backend_kwargs(kv_pool=Pool(), req_to_token=req_to_token, page_size=page))
    backend.reserve(4)
    assert backend._graph_indices.numel() == 64 // page + 4

    def batch(rows, lens):
        return ForwardBatch(mode=ForwardMode.DECODE, batch_size=len(rows), input_ids=torch.zeros(len(rows)),
                            positions=torch.zeros(len(rows)), req_pool_indices=torch.tensor(rows),
                            seq_lens=torch.tensor(lens), out_cache_loc=torch.zeros(len(rows)),
                            seq_lens_cpu=list(lens))

    for bs in (4, 2):
        static = batch([0] * bs, [1] * bs)
        backend.begin_graph_capture(static)
        backend.init_forward_metadata(static)                  # inside the capture: no plan
        backend.end_graph_capture()
        w = backend._graph_wrappers[bs, None]
        assert w.graph and w.plans == [([*range(bs + 1)], [0] * bs, [1] * bs)]
        indptr, indices, last = w.buffers
        assert indptr.numel() == bs + 1 and last.numel() == bs and indices is backend._graph_indices
    assert all(not s.decode[None].plans for s in backend._sets)

    replay = batch([3, 1, 0, 0], [9, 4, 1, 1])                 # two real rows, two padded rows
    backend.prepare_graph_replay(replay)
    assert backend._graph_wrappers[4, None].plans[-1] == ([0, 3, 4, 5, 6], [24, 25, 26, 8, 0, 0], [1, 4, 1, 1])
    assert FakeEvent.log == ["record", "record", "synchronize", "record"]
    assert backend.fits_graph(replay) and not backend.fits_graph(batch([1] * 4, [17] * 4))
    backend.init_forward_metadata(replay)                      # eager decode: the same page table
    assert backend._sets[0].decode[None].plans == [backend._graph_wrappers[4, None].plans[-1]]


def test_each_sliding_window_has_its_wrappers_planned_with_window_left(fake_flashinfer):
    """A model with full layers and layers of window 8: every step plans a wrapper per window,
    window 8 as window_left 7 (FlashInfer counts the keys left of the query), and each layer runs
    its window's wrapper, eager and captured."""
    from engine.runner.forward_batch import ForwardBatch, ForwardMode

    class Pool:
        capacity = 64
        k_buffers = v_buffers = [torch.zeros(64, 8, 128, dtype=torch.bfloat16)]

        def set_kv(self, *args):
            pass

    req_to_token = torch.arange(8 * 32, dtype=torch.int32).view(8, 32)
    backend = FlashInferAttentionBackend(**backend_kwargs(kv_pool=Pool(), req_to_token=req_to_token, page_size=4,
                                                          sliding_windows=(None, 8)))
    backend.reserve(2)
    batch = ForwardBatch(mode=ForwardMode.DECODE, batch_size=2, input_ids=torch.zeros(2), positions=torch.zeros(2),
                         req_pool_indices=torch.tensor([3, 1]), seq_lens=torch.tensor([9, 4]),
                         out_cache_loc=torch.zeros(2), seq_lens_cpu=[9, 4])
    extend = ForwardBatch(mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(3), positions=torch.zeros(3),
                          req_pool_indices=torch.tensor([0]), seq_lens=torch.tensor([3]),
                          out_cache_loc=torch.zeros(3), seq_lens_cpu=[3], extend_prefix_lens_cpu=[0],
                          extend_seq_lens_cpu=[3])
    q, kv = torch.zeros(2, 32, 128, dtype=torch.bfloat16), torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    for step in (batch, extend):
        backend.init_forward_metadata(step)
        kind = "decode" if step.mode.is_decode else "extend"
        full, windowed = (getattr(backend._sets[0 if kind == "decode" else 1], kind)[w] for w in (None, 8))
        assert full.window_lefts == [-1] and windowed.window_lefts == [7]
        assert full.plans == windowed.plans                     # the same page table
        t = step.num_tokens
        backend.forward(q[:1].expand(t, -1, -1), kv[:1].expand(t, -1, -1), kv[:1].expand(t, -1, -1), 0, 0.088,
                        step, sliding_window=8)
        assert (full.runs, windowed.runs) == (0, 1)
    with pytest.raises(ValueError, match="sliding window 16, which the backend was not built for"):
        backend.forward(q, kv, kv, 0, 0.088, batch, sliding_window=16)

    backend.begin_graph_capture(batch)
    backend.end_graph_capture()
    assert [backend._graph_wrappers[2, w].window_lefts for w in (None, 8)] == [[-1], [7]]
    backend.prepare_graph_replay(batch)
    assert [backend._graph_wrappers[2, w].window_lefts for w in (None, 8)] == [[-1, -1], [7, 7]]


def backend_kwargs(**over):
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, kv_pool=None,
              req_to_token=torch.zeros(2, 8, dtype=torch.int32), page_size=16, dtype=torch.bfloat16,
              device=torch.device("cpu"))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, message", [
    (dict(dtype=torch.float32), "--attention-backend flashinfer runs float16 and bfloat16, not float32"),
    (dict(head_dim=32), "--attention-backend flashinfer supports head_dim (64, 128, 256), this model has 32"),
    (dict(num_q_heads=12), "num_q_heads (12) must be a multiple of num_kv_heads (8)"),
])
def test_unsupported_model_shapes_are_clear_errors(over, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FlashInferAttentionBackend(**backend_kwargs(**over))


def test_installed_but_broken_package_is_a_clear_error(break_import):
    """find_spec finds it, the import fails: the error says so instead of a bare ImportError."""
    break_import("flashinfer", "libcudart.so.13: cannot open shared object file")
    with pytest.raises(RuntimeError, match="flashinfer-python is installed but failed to import "
                                           r"\(ImportError: libcudart"):
        FlashInferAttentionBackend(**backend_kwargs())


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_table_lists_each_requests_pages_in_position_order(page_size):
    """Against a loop over positions, with pages handed out in shuffled order and request rows
    that are not 0..B-1."""
    g = torch.Generator().manual_seed(page_size)
    lens = [1, page_size, page_size + 1, 3 * page_size - 1, 70, 5]
    max_pages = -(-max(lens) // page_size)
    pages = torch.randperm(len(lens) * max_pages + 9, generator=g)[: len(lens) * max_pages].view(len(lens), -1)
    pos = torch.arange(max_pages * page_size)
    rows = torch.tensor([4, 0, 7, 2, 5, 1])
    req_to_token = torch.full((8, max_pages * page_size), -1, dtype=torch.int32)
    req_to_token[rows] = (pages[:, pos // page_size] * page_size + pos % page_size).int()

    indptr, last_page_len = host_page_table(lens, page_size)
    indices = page_indices(req_to_token, rows, torch.tensor(lens), int(indptr[-1]), page_size)

    expected = []
    for r, n in zip(rows.tolist(), lens):
        for p in range(0, n, page_size):   # each page of the request, by its first position
            expected.append(int(req_to_token[r, p]) // page_size)
    assert indices.dtype == torch.int32 and indices.tolist() == expected
    assert indptr.dtype == torch.int32
    assert indptr.tolist() == [0] + torch.tensor([-(-n // page_size) for n in lens]).cumsum(0).tolist()
    assert last_page_len.tolist() == [n - (-(-n // page_size) - 1) * page_size for n in lens]
    assert all(1 <= x <= page_size for x in last_page_len.tolist())
