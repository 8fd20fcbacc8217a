"""Piecewise graphs (--enable-piecewise-cuda-graph) on the CPU: the runner's staging of q/k/v, its
padded static inputs and its attention between the pieces give the eager step's logits and the
scheduler's tokens, through a fake runner whose pieces run eagerly (a "replay" runs the stack
again over the padded static inputs, and each attention runs on the real rows where a replay runs
it, between two pieces). The real capture runs on the GPU (tests/gpu/test_piecewise_graph_gpu.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from backends.cpu.platform import CpuPlatform
from engine.runner.forward_batch import ForwardBatch
from hal.piecewise_graph import PiecewiseGraphRunner, capture_token_counts
from hal.registry import Entry, _REGISTRY
from test_graph_runner import GraphCpuPlatform, make_runner
from test_mixed_chunk import _compare
from test_overlap import _req, _run, _scheduler, _stop_id, _workload


class EagerPieces(PiecewiseGraphRunner):
    name = "eager_pieces"
    instances: list["EagerPieces"] = []

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.kwargs = kw
        self.live: ForwardBatch | None = None
        self.pieces_begun = 0
        EagerPieces.instances.append(self)

    def _capture_stream(self):
        return contextlib.nullcontext()

    def _begin_piece(self):
        self.pieces_begun += 1
        return object()

    def _end_piece(self, graph) -> None:
        pass

    def _replay(self, graph) -> None:
        raise AssertionError("EagerPieces replays by running the stack")

    def attention(self, layer, q, k, v, rotary, batch):
        out = super().attention(layer, q, k, v, rotary, batch)
        if self.live is not None:
            self._attend(layer, self.live, self._rows(self.live.num_tokens))
        return out

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        n, padded = batch.num_tokens, self.padded_count(batch.num_tokens)
        self._load(batch)
        self.live = batch
        try:
            hidden = self._run_stack(padded)
        finally:
            self.live = None
        self._hidden[:padded].copy_(hidden)
        self.replays += 1
        return self._hidden[:n]


@pytest.fixture
def fake_pieces(monkeypatch):
    """The eager pieces, registered for the cpu platform. (Decode steps stay eager: the torch
    attention cannot be captured, which the pieces do not need.)"""
    EagerPieces.instances.clear()
    monkeypatch.setitem(_REGISTRY["piecewise_graph_runner"], "eager_pieces",
                        Entry("piecewise_graph_runner", "eager_pieces", EagerPieces, frozenset({"cpu"}),
                              lambda: True))
    return EagerPieces.instances


def test_capture_token_counts():
    assert capture_token_counts(2048)[:12] == [8, 16, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384]
    assert capture_token_counts(2048)[-3:] == [1792, 1920, 2048]
    assert capture_token_counts(100) == [8, 16, 32, 64, 96, 100]
    assert capture_token_counts(5) == [5]
    c = capture_token_counts(4096)
    assert all(b / a <= 2 for a, b in zip(c, c[1:])) and all(b / a <= 1.25 for a, b in zip(c, c[1:]) if a >= 256)
    with pytest.raises(ValueError, match=">= 1"):
        capture_token_counts(0)


def test_off_unless_asked_and_where_graphs_are(llama_tiny, fake_pieces):
    assert "piecewise_graphs=off " in make_runner(llama_tiny, GraphCpuPlatform()).describe()
    hint = "piecewise_graphs=off (mixed steps run eagerly; --enable-piecewise-cuda-graph captures them)"
    assert hint in make_runner(llama_tiny, GraphCpuPlatform(), enable_mixed_chunk=True).describe()
    assert hint not in make_runner(llama_tiny, enable_mixed_chunk=True).describe()     # no graphs on this platform
    r = make_runner(llama_tiny, enable_piecewise_cuda_graph=True)
    assert r.piecewise_runner is None and "piecewise_graphs=off (cpu has no device graphs)" in r.describe()
    r = make_runner(llama_tiny, GraphCpuPlatform(), enable_piecewise_cuda_graph=True, disable_cuda_graph=True)
    assert r.piecewise_runner is None and "piecewise_graphs=off (--disable-cuda-graph)" in r.describe()
    assert not fake_pieces


def test_captures_one_set_of_pieces_per_token_count(llama_tiny, fake_pieces):
    r = make_runner(llama_tiny, GraphCpuPlatform(), enable_piecewise_cuda_graph=True,
                    piecewise_cuda_graph_max_tokens=100)
    pw = fake_pieces[0]
    assert r.piecewise_runner is pw and pw.token_counts == [8, 16, 32, 64, 96, 100]
    layers = r.model_config.num_hidden_layers
    assert len(pw._layers) == layers and set(pw._pieces) == set(pw.token_counts)
    assert all(len(p) == layers + 1 for p in pw._pieces.values())
    assert pw.pieces_begun == (layers + 1) * len(pw.token_counts)
    assert "piecewise_graphs=eager_pieces (6 token counts 8,16,32,64,96,100" in r.describe()


def test_capture_failures_say_what_to_change(llama_tiny, fake_pieces, monkeypatch):
    def oom(self, n):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EagerPieces, "_capture_count", oom)
    with pytest.raises(RuntimeError, match=r"in pieces up to 100 tokens ran out of device memory after the KV "
                                           r"cache took .* GiB: lower --max-total-tokens \(now 512\) or "
                                           r"--piecewise-cuda-graph-max-tokens \(now 100\), or leave out "
                                           r"--enable-piecewise-cuda-graph"):
        make_runner(llama_tiny, GraphCpuPlatform(), enable_piecewise_cuda_graph=True,
                    piecewise_cuda_graph_max_tokens=100)

    def broken(self, n):
        raise ValueError("no kernel for this shape")

    monkeypatch.setattr(EagerPieces, "_capture_count", broken)
    with pytest.raises(RuntimeError, match=r"at 100 tokens in pieces failed \(no kernel for this shape\); lower "
                                           r"--piecewise-cuda-graph-max-tokens"):
        make_runner(llama_tiny, GraphCpuPlatform(), enable_piecewise_cuda_graph=True,
                    piecewise_cuda_graph_max_tokens=100)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2_moe"])
def test_scheduler_tokens_equal_eager(arch, make_tiny, fake_pieces, monkeypatch):
    """Every extend step (prompt chunks, mixed steps with the decoding rows) goes through the
    pieces; tokens, finish reasons and output and prompt logprobs equal the eager run's. (The
    MoE model's experts run in the pieces: the torch reference is not graph-safe, but these
    pieces run eagerly, so it is marked safe here.)"""
    path = make_tiny(arch)
    from backends.cpu.torch_layer_ops import TorchLayerOps
    monkeypatch.setattr(TorchLayerOps, "fused_moe_graph_safe", True)
    stop_id = _stop_id(path)
    kw = dict(enable_mixed_chunk=True, max_running_requests=3, chunked_prefill_size=24)
    want = _run(_scheduler(path, overlap=True, **kw), _workload(stop_id))
    monkeypatch.setattr(CpuPlatform, "supports_graphs", True)
    # 20 tokens at most: steps of 8, 16 and 20 rows replay padded, longer ones run eagerly
    s = _scheduler(path, overlap=True, enable_piecewise_cuda_graph=True, piecewise_cuda_graph_max_tokens=20, **kw)
    pw = s.runner.piecewise_runner
    assert pw is fake_pieces[0]
    got = _run(s, _workload(stop_id))
    _compare(want, got)
    assert pw.replays > 5, "no extend step went through the pieces"
    t = s.clock.totals
    assert t.mixed_decode_tokens > 0
    assert 0 < t.piecewise_prefill_steps < t.prefill_steps and "as graph pieces" in t.describe()


def test_prompt_logprobs_and_verify_steps_through_the_pieces(llama_tiny, fake_pieces, monkeypatch):
    """The logits are computed outside the pieces from the captured hidden states, so prompt
    logprobs (rows of every chunk) and speculative verify steps (logits at every position) equal
    the eager run's."""
    import dataclasses

    from test_speculative import SPEC, _mixed_batch

    def prompt_lp_reqs():
        out = []
        for i in range(4):
            r = _req(f"p{i}", [(13 * i + j) % 1500 + 10 for j in range(12 + 5 * i)], logprobs=2,
                     max_new_tokens=5 + i, temperature=0, ignore_eos=True)
            out.append(dataclasses.replace(r, logprob_start_len=2 * i))
        return out

    for make, kw in ((prompt_lp_reqs, dict(max_running_requests=2, chunked_prefill_size=16)),
                     (_mixed_batch, SPEC)):
        want = _run(_scheduler(llama_tiny, overlap=False, **kw), make())
        with monkeypatch.context() as m:
            m.setattr(CpuPlatform, "supports_graphs", True)
            s = _scheduler(llama_tiny, overlap=False, enable_piecewise_cuda_graph=True,
                           piecewise_cuda_graph_max_tokens=64, **kw)
        got = _run(s, make())
        _compare(want, got)
        assert s.runner.piecewise_runner.replays > 3
    assert s.spec.totals.verify_steps > 0 and s.spec.totals.accepted_tokens > 10
