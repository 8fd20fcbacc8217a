"""The graph runner role on the CPU: the model runner runs eagerly where the platform has no device
graphs or --disable-cuda-graph says so, and picks the registered graph runner otherwise (a fake
platform with graphs and a fake runner that "replays" by running the step again); the padding of a
batch to a captured size never points a padded row at real KV."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import hal
from backends.cpu.platform import CpuPlatform
from backends.cpu.torch_attention import TorchAttentionBackend
from engine.runner.forward_batch import ForwardBatch, ForwardMode
from engine.server_args import ServerArgs
from hal.attention import AttentionBackend
from hal.graph_runner import GraphRunner, capture_batch_sizes
from hal.registry import Entry, _REGISTRY


class GraphCpuPlatform(CpuPlatform):
    """The CPU, claiming device graphs."""
    supports_graphs = True


class RerunGraphRunner(GraphRunner):
    """A 'graph' that runs the captured step again and writes the result where the graph's output
    lives, as a real replay would."""
    name = "rerun"
    instances: list["RerunGraphRunner"] = []

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.kwargs = kw
        RerunGraphRunner.instances.append(self)

    def _capture_one(self, fn: Callable[[], torch.Tensor]):
        out = fn()
        return (lambda: out.copy_(fn())), out

    def _replay(self, graph) -> None:
        graph()


class AttentionStub(AttentionBackend):
    """Only what the graph runner asks of an attention backend."""
    reserved = 0

    def __init__(self) -> None:
        pass

    def reserve(self, n: int) -> None:
        self.reserved = n

    def init_forward_metadata(self, batch) -> None:
        raise AssertionError("the graph runner never prepares a step itself")

    forward = init_forward_metadata


@pytest.fixture
def fake_graphs(monkeypatch):
    """Register the rerun runner for the cpu platform and let the torch attention be 'captured'."""
    RerunGraphRunner.instances.clear()
    monkeypatch.setitem(_REGISTRY["graph_runner"], "rerun",
                        Entry("graph_runner", "rerun", RerunGraphRunner, frozenset({"cpu"}), lambda: True))
    monkeypatch.setattr(TorchAttentionBackend, "reserve", lambda self, n: None, raising=False)
    return RerunGraphRunner.instances


def make_runner(path, platform=None, **kw):
    from engine.runner.model_runner import ModelRunner

    args = ServerArgs.from_kwargs(model_path=str(path), device="cpu", max_total_tokens=512, page_size=4, **kw)
    return ModelRunner(args, platform=platform)


def decode_batch(n: int, base: int = 0) -> ForwardBatch:
    def col(offset: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64) + base + offset

    return ForwardBatch(mode=ForwardMode.DECODE, batch_size=n, input_ids=col(100), positions=col(200),
                        req_pool_indices=col(300), seq_lens=col(400), out_cache_loc=col(500),
                        seq_lens_cpu=[0] * n)


def test_capture_batch_sizes_cover_one_to_max():
    assert capture_batch_sizes(160) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160]
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    with pytest.raises(ValueError, match=">= 1"):
        capture_batch_sizes(0)


def test_cpu_runs_eager(llama_tiny):
    runner = make_runner(llama_tiny)
    assert runner.graph_runner is None
    assert "graphs=off (cpu has no device graphs)" in runner.describe()


def test_padding_slot_is_never_allocated(llama_tiny):
    runner = make_runner(llama_tiny)
    assert runner.pad_slot == runner.allocator.capacity == runner.max_total_tokens
    assert runner.kv_pool.capacity == runner.allocator.capacity + runner.server_args.page_size


def test_platform_with_graphs_selects_and_captures_the_graph_runner(llama_tiny, fake_graphs):
    runner = make_runner(llama_tiny, GraphCpuPlatform(), max_running_requests=6, cuda_graph_max_bs=40)
    assert runner.graph_runner is fake_graphs[0]
    gr = fake_graphs[0]
    assert gr.batch_sizes == [1, 2, 4, 6]                      # capped by max_running_requests
    assert gr.kwargs["pad_slot"] == runner.pad_slot
    assert set(gr._graphs) == {1, 2, 4, 6}
    assert "graphs=rerun (4 batch sizes 1,2,4,6" in runner.describe()


def test_disable_cuda_graph_keeps_eager(llama_tiny, fake_graphs):
    runner = make_runner(llama_tiny, GraphCpuPlatform(), disable_cuda_graph=True)
    assert runner.graph_runner is None and not fake_graphs
    assert "graphs=off (--disable-cuda-graph)" in runner.describe()


def test_out_of_memory_while_capturing_says_what_to_lower(llama_tiny, fake_graphs, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(RerunGraphRunner, "capture", oom)
    with pytest.raises(RuntimeError, match=r"batch size 6 ran out of device memory.*--max-total-tokens "
                                           r"\(now 512\).*--cuda-graph-max-bs \(now 40\).*--disable-cuda-graph"):
        make_runner(llama_tiny, GraphCpuPlatform(), max_running_requests=6, cuda_graph_max_bs=40)


def test_attention_without_reserve_keeps_eager(llama_tiny, fake_graphs, monkeypatch):
    monkeypatch.delattr(TorchAttentionBackend, "reserve")
    runner = make_runner(llama_tiny, GraphCpuPlatform())
    assert runner.graph_runner is None and not fake_graphs
    assert "cannot be captured" in runner.describe()


def test_decode_replays_and_extend_runs_eager(llama_tiny, fake_graphs, monkeypatch):
    runner = make_runner(llama_tiny, GraphCpuPlatform(), max_running_requests=4)
    gr = fake_graphs[0]
    eager_calls = []
    monkeypatch.setattr(runner, "_forward_eager",
                        lambda b: eager_calls.append(b.mode) or torch.zeros(b.batch_size, 3))
    monkeypatch.setattr(gr, "replay", lambda b: torch.ones(b.batch_size, 3))
    assert runner.forward(decode_batch(3)).sum() == 9
    too_big = decode_batch(5)
    assert runner.forward(too_big).sum() == 0
    ext = ForwardBatch(mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(4, dtype=torch.int64),
                       positions=torch.arange(4), req_pool_indices=torch.zeros(1, dtype=torch.int64),
                       seq_lens=torch.tensor([4]), out_cache_loc=torch.arange(4), seq_lens_cpu=[4])
    runner.forward(ext)
    assert eager_calls == [ForwardMode.DECODE, ForwardMode.EXTEND]


def test_replay_pads_to_the_next_size_with_the_padding_slot_and_row():
    seen: list[ForwardBatch] = []

    def forward(b: ForwardBatch) -> torch.Tensor:
        seen.append(b)
        cols = [b.input_ids, b.positions, b.req_pool_indices, b.seq_lens, b.out_cache_loc]
        out = torch.stack(cols, dim=1).float()                         # [bs, 5]
        if b.logits_out is not None:                                   # as LogitsProcessor does
            return b.logits_out.copy_(out)
        return out

    gr = RerunGraphRunner(forward=forward, attn_backend=AttentionStub(), max_batch_size=8,
                          max_running_requests=12, pad_slot=999, pad_req_row=7, device=torch.device("cpu"))
    gr.capture()
    assert gr.attn_backend.reserved == 12
    assert [b.batch_size for b in seen] == [8, 4, 2, 1]                # largest first
    with torch.inference_mode():                                       # as ModelRunner.forward runs it
        out = gr.replay(decode_batch(8, base=1000))                   # fills all 8 columns
        assert out.shape == (8, 5)
        out = gr.replay(decode_batch(3))
    assert out.shape == (3, 5)
    assert out[:, 0].tolist() == [100, 101, 102] and out[:, 4].tolist() == [500, 501, 502]
    assert all(b.logits_out is not None for b in seen[1:4]), "smaller steps write the largest one's logits"
    graph_out = gr._logits                                             # row 3: what the padded row computed
    assert graph_out[3].tolist() == [0, 0, 7, 1, 999], "a stale row of the larger batch leaked into padding"
    assert gr.padded_size(3) == 4 and gr.padded_size(5) == 8 and gr.padded_size(1) == 1
    assert gr.can_run(decode_batch(8)) and not gr.can_run(decode_batch(9))


class HostPlanStub(AttentionStub):
    """A backend that plans each step on the host (as FlashInfer does): records the graph hooks."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin_graph_capture(self, batch) -> None:
        self.events.append(("begin", batch.batch_size, list(batch.seq_lens_cpu)))

    def end_graph_capture(self) -> None:
        self.events.append(("end",))

    def prepare_graph_replay(self, batch) -> None:
        self.events.append(("replay", batch.batch_size, list(batch.seq_lens_cpu),
                            batch.req_pool_indices.tolist(), batch.seq_lens.tolist()))


def test_graph_hooks_frame_each_capture_and_precede_each_replay():
    stub = HostPlanStub()
    captured = []

    def forward(b: ForwardBatch) -> torch.Tensor:
        captured.append(stub.events[-1])                               # inside begin ... end
        out = torch.zeros(b.batch_size, 2)
        return b.logits_out.copy_(out) if b.logits_out is not None else out

    gr = RerunGraphRunner(forward=forward, attn_backend=stub, max_batch_size=4, max_running_requests=4,
                          pad_slot=99, pad_req_row=5, device=torch.device("cpu"))
    gr.capture()
    assert stub.events == [e for bs in (4, 2, 1) for e in (("begin", bs, [1] * bs), ("end",))]
    assert captured == [("begin", 4, [1] * 4), ("begin", 2, [1] * 2), ("begin", 1, [1])]
    stub.events.clear()
    b = decode_batch(3)
    b.seq_lens_cpu = [400, 401, 402]
    gr._replay = lambda graph: stub.events.append(("launch",))
    gr.replay(b)
    # the replay hook sees the padded batch: host lengths, and the device rows already written
    assert stub.events == [("replay", 4, [400, 401, 402, 1], [300, 301, 302, 5], [400, 401, 402, 1]),
                           ("launch",)]


def test_backends_that_plan_inside_the_step_skip_the_replay_hook():
    gr = RerunGraphRunner(forward=lambda b: torch.zeros(b.batch_size, 1), attn_backend=AttentionStub(),
                          max_batch_size=2, max_running_requests=2, pad_slot=9, pad_req_row=0,
                          device=torch.device("cpu"))
    assert not gr._plans_on_host and RerunGraphRunner(
        forward=gr.forward, attn_backend=HostPlanStub(), max_batch_size=2, max_running_requests=2, pad_slot=9,
        pad_req_row=0, device=torch.device("cpu"))._plans_on_host


def test_selection_lists_the_graph_runner_only_where_registered():
    entries = hal.registry.entries("graph_runner")
    assert "cuda_graph" in entries
    assert entries["cuda_graph"].platforms == frozenset({"cuda", "hip"})
    with pytest.raises(hal.BackendSelectionError):
        hal.select("graph_runner", CpuPlatform())
