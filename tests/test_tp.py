"""Tensor parallelism on the CPU over gloo: real rank processes behind ProcessSchedulerClient give the
same greedy tokens as one rank; each rank reads only its shard; a dying rank is reported, not a hang."""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest
import torch
from safetensors.torch import save_file

from engine.entrypoints.scheduler_process import ProcessSchedulerClient
from engine.io_struct import BatchTokenOutput, SchedulerError, TokenizedGenerateReq
from engine.mem_cache.allocator import ReqToTokenPool
from engine.layers import parallel_state
from engine.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig
from engine.runner.model_loader import dummy_tensor, fill_dummy_weights, iterate_safetensors, load_model
from engine.sampling.sampling_params import SamplingParams
from engine.server_args import ServerArgs
from hal.collectives import SingleProcessCollectives

PROMPTS = [[5 + i, 17, 33 + i, 99, 4, 250 + 3 * i] * (i + 1) for i in range(6)] + [[7] * 40, [7] * 40 + [9, 10]]


def _generate(model_path, tp: int, max_new_tokens: int = 24, device: str = "cpu", regex: dict[int, str] | None = None,
              prompt_logprobs: dict | None = None, **kw) -> dict[str, list[int]]:
    """Greedy tokens of PROMPTS; ``regex``: prompt index -> a grammar for that request;
    ``prompt_logprobs``: a dict to fill with each request's prompt logprobs (request i from position i)."""
    args = ServerArgs(model_path=str(model_path), device=device, tp_size=tp, max_total_tokens=4096,
                      log_level="warning", **kw)
    client = ProcessSchedulerClient(args, startup_timeout=180)
    try:
        out: queue.Queue = queue.Queue()
        client.start(out.put)
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
        for i, p in enumerate(PROMPTS):
            extra = {"regex": regex[i], "ignore_eos": False} if regex and i in regex else {}
            lp = dict(return_logprob=True, logprob_start_len=i) if prompt_logprobs is not None else {}
            client.send(TokenizedGenerateReq(rid=str(i), input_ids=p,
                                             sampling_params=SamplingParams.from_dict({**params, **extra}), **lp))
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
        done: set[str] = set()
        while len(done) < len(PROMPTS):
            o = out.get(timeout=120)
            assert isinstance(o, BatchTokenOutput), o
            for k, (rid, ids, fin) in enumerate(zip(o.rids, o.new_token_ids, o.finished_reasons)):
                tokens[rid] += ids
                if prompt_logprobs is not None:
                    prompt_logprobs.setdefault(rid, []).extend(o.input_token_logprobs[k])
                if fin:
                    assert fin["type"] == ("stop" if regex and int(rid) in regex else "length"), fin
                    done.add(rid)
        return tokens
    finally:
        client.shutdown()


def test_tp2_prompt_logprobs_equal_tp1(llama_tiny):
    """The logits of every scored prompt position are gathered across ranks like the last one's."""
    one, two = {}, {}
    want = _generate(llama_tiny, 1, max_new_tokens=4, chunked_prefill_size=32, prompt_logprobs=one)
    got = _generate(llama_tiny, 2, max_new_tokens=4, chunked_prefill_size=32, prompt_logprobs=two)
    assert got == want
    for i, p in enumerate(PROMPTS):
        assert len(two[str(i)]) == len(p) - i and (i > 0 or two["0"][0] is None)
        assert [x for x in two[str(i)] if x is not None] == pytest.approx(
            [x for x in one[str(i)] if x is not None], abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tp2_greedy_tokens_equal_tp1(make_tiny, arch):
    # two safetensors shards: the index path and lazy (sliced) reads together
    path = make_tiny(arch, num_shards=2)
    one = _generate(path, 1)
    two = _generate(path, 2)
    assert all(len(v) == 24 for v in one.values())
    assert two == one


def test_tp2_with_the_overlap_scheduler(llama_tiny, monkeypatch):
    """Overlap on (as on GPUs): rank 0 feeds tokens still on the device, the other ranks take
    them from their own future slots, filled by rank 0's broadcast after each sampling. Two requests
    follow grammars: rank 0 reads their tokens back between the forward and the sampling."""
    grammars = {1: "[a-z ]{12,16}", 4: "(yes|no|maybe)"}
    monkeypatch.setenv("ANYSERVE_OVERLAP", "1")     # inherited by the spawned ranks
    overlapped = _generate(llama_tiny, 2, regex=grammars)
    monkeypatch.delenv("ANYSERVE_OVERLAP")
    assert overlapped == _generate(llama_tiny, 1, regex=grammars)
    assert 2 <= len(overlapped["4"]) <= 4 < len(overlapped["1"]) < 24


def test_tp2_with_mixed_chunks_and_overlap(llama_tiny, monkeypatch):
    """Mixed steps (running requests decode inside prefill batches, their inputs still on the
    device under overlap) run on every rank; the tokens equal the plain loop at tp 1."""
    monkeypatch.setenv("ANYSERVE_OVERLAP", "1")     # inherited by the spawned ranks
    mixed = _generate(llama_tiny, 2, enable_mixed_chunk=True, max_running_requests=3, chunked_prefill_size=16)
    monkeypatch.delenv("ANYSERVE_OVERLAP")
    assert mixed == _generate(llama_tiny, 1)


def test_tp2_with_speculative_decoding(llama_tiny):
    """Verify steps (an extend over each request's drafts, logits at every position) run on every
    rank like any batch; the tokens equal plain decoding at tp 1."""
    spec = _generate(llama_tiny, 2, speculative_algorithm="NGRAM", speculative_num_draft_tokens=3)
    assert spec == _generate(llama_tiny, 1)


def test_tp4_replicates_kv_heads_and_chunked_prefill(llama_tiny):
    # tiny has 2 KV heads: with 4 ranks each keeps a copy of one; chunked prefill and the radix
    # cache (the last two prompts share 40 tokens) exercise the req_to_token journal.
    kw = dict(chunked_prefill_size=16)
    assert _generate(llama_tiny, 4, max_new_tokens=12, **kw) == _generate(llama_tiny, 1, max_new_tokens=12, **kw)


def test_dummy_weights_give_the_same_tokens_at_tp1_and_tp2(llama_tiny):
    """--load-format dummy draws each full checkpoint tensor from its own seed and every rank keeps
    its slice, so tp2 computes the tp1 model (real-shape GPU runs check token identity this way)."""
    one = _generate(llama_tiny, 1, max_new_tokens=12, load_format="dummy")
    assert len({t for v in one.values() for t in v}) > 3      # random weights, not a constant answer
    assert _generate(llama_tiny, 2, max_new_tokens=12, load_format="dummy") == one


def _sharded(build, tp: int) -> list[torch.nn.Module]:
    """``build(tp_rank, tp_size)`` for every rank of ``tp``, each filled with dummy weights."""
    ranks = []
    for rank in range(tp):
        m = build(rank, tp)
        fill_dummy_weights(m)
        ranks.append(m)
    return ranks


class _Layers(torch.nn.Module):
    def __init__(self, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        kw = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.column = ColumnParallelLinear(16, 24, bias=True, **kw)
        self.row = RowParallelLinear(24, 16, bias=True, **kw)
        self.embed = VocabParallelEmbedding(37, 16, **kw)     # 37 rows: the last rank's are padded


def test_dummy_full_tensor_is_tp1_and_the_concatenation_of_tp2_shards():
    (one,), two = _sharded(_Layers, 1), _sharded(_Layers, 2)
    full = {name: dummy_tensor(name, None, shape, torch.float32, "cpu")
            for name, shape in [("column.weight", (24, 16)), ("column.bias", (24,)), ("row.weight", (16, 24)),
                                ("row.bias", (16,)), ("embed.weight", (37, 16))]}
    w = full["column.weight"]
    assert w.std() > 0.01 and not torch.equal(w[:12], w[12:])
    for name in ("column.weight", "column.bias", "row.bias", "embed.weight"):
        assert torch.equal(one.get_parameter(name), full[name]), name
    assert torch.equal(torch.cat([m.column.weight for m in two]), full["column.weight"])
    assert torch.equal(torch.cat([m.column.bias for m in two]), full["column.bias"])
    assert torch.equal(torch.cat([m.row.weight for m in two], dim=1), full["row.weight"])
    assert all(torch.equal(m.row.bias, full["row.bias"]) for m in two)    # added once, not split
    assert torch.equal(torch.cat([m.embed.weight for m in two])[:37], full["embed.weight"])
    assert torch.all(two[1].embed.weight[18:] == 0)


def test_dummy_fused_shards_split_like_a_checkpoint():
    """q/k/v and gate/up are drawn as separate checkpoint tensors, so each rank's fused matrix
    holds its slice of each; with 4 ranks over 2 KV heads, ranks share a KV head's copy."""
    def build(rank, tp):
        m = torch.nn.Module()
        m.qkv = QKVParallelLinear(16, 4, num_heads=4, num_kv_heads=2, tp_rank=rank, tp_size=tp)
        m.gate_up = MergedColumnParallelLinear(16, [8, 8], tp_rank=rank, tp_size=tp)
        return m

    (one,), four = _sharded(build, 1), _sharded(build, 4)
    q, k, v = one.qkv.weight.split([16, 8, 8])
    gate, up = one.gate_up.weight.split([8, 8])
    for rank, m in enumerate(four):
        rq, rk, rv = m.qkv.weight.split([4, 4, 4])
        kv = rank // 2
        assert torch.equal(rq, q[4 * rank:4 * rank + 4])
        assert torch.equal(rk, k[4 * kv:4 * kv + 4]) and torch.equal(rv, v[4 * kv:4 * kv + 4])
        rg, ru = m.gate_up.weight.split([2, 2])
        assert torch.equal(rg, gate[2 * rank:2 * rank + 2]) and torch.equal(ru, up[2 * rank:2 * rank + 2])
    assert not torch.equal(q[:8], k) and not torch.equal(gate, up)


def dummy_rank_models(cfg: ModelConfig, tp_size: int) -> list:
    """The dummy-weight model of each of ``tp_size`` ranks, built in this process one after another."""
    models = []
    try:
        for rank in range(tp_size):
            parallel_state.set_tp(rank, tp_size, SingleProcessCollectives())
            models.append(load_model(cfg, "dummy", "cpu"))
    finally:
        parallel_state.set_tp(0, 1)
    return models


def test_dummy_llama_tp2_shards_concatenate_to_tp1(llama_tiny):
    cfg = ModelConfig.from_pretrained(str(llama_tiny), dtype="float32")
    one = load_model(cfg, "dummy", "cpu")
    two = dummy_rank_models(cfg, 2)
    row_parallel = ("o_proj", "down_proj")
    for name, p in one.named_parameters():
        shards = [m.get_parameter(name) for m in two]
        if "norm" in name:
            assert all(torch.equal(s, p) for s in shards) and torch.all(p == 1), name
        elif any(r in name for r in row_parallel):
            assert torch.equal(torch.cat(shards, dim=1), p), name
        elif "embed_tokens" in name:
            assert torch.equal(torch.cat(shards)[:cfg.vocab_size], p), name
        elif "gate_up" in name:
            parts = [s.chunk(2) for s in shards]     # [gate | up] per rank
            assert torch.equal(torch.cat([h[0] for h in parts] + [h[1] for h in parts]), p), name
        elif "qkv" in name:
            q, kv = cfg.num_attention_heads * cfg.head_dim // 2, cfg.num_key_value_heads * cfg.head_dim // 2
            parts = [s.split([q, kv, kv]) for s in shards]     # [q | k | v] per rank
            assert torch.equal(torch.cat([h[i] for i in range(3) for h in parts]), p), name
        else:
            pytest.fail(f"{name}: no sharding rule in this test")


def test_dying_rank_is_reported(llama_tiny):
    args = ServerArgs(model_path=str(llama_tiny), device="cpu", tp_size=2, max_total_tokens=2048,
                      log_level="warning")
    client = ProcessSchedulerClient(args, startup_timeout=180)
    try:
        out: queue.Queue = queue.Queue()
        client.start(out.put)
        os.kill(client.tp_processes[0].pid, signal.SIGKILL)
        params = SamplingParams.from_dict({"max_new_tokens": 8, "temperature": 0})
        client.send(TokenizedGenerateReq(rid="a", input_ids=[5, 6, 7], sampling_params=params))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            o = out.get(timeout=60)
            if isinstance(o, SchedulerError):
                break
        else:
            pytest.fail("no SchedulerError after a rank died")
        assert not client.is_alive()
    finally:
        client.shutdown()


def test_lazy_tensor_reads_only_the_slice(tmp_path):
    w = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    f = tmp_path / "w.safetensors"
    save_file({"w": w}, str(f))
    stats: dict = {}
    (name, lazy), = list(iterate_safetensors([str(f)], stats=stats, lazy=True))
    assert name == "w" and tuple(lazy.shape) == (6, 8) and lazy.dtype == torch.float32
    assert torch.equal(lazy.narrow(1, 4, 4), w[:, 4:])
    assert stats["bytes"] == 6 * 4 * 4          # half the columns, nothing else read
    full = torch.zeros(6, 8)
    full.copy_(lazy)                              # any other use reads it whole
    assert torch.equal(full, w)


def test_req_to_token_journal_replays_on_another_pool():
    src, dst = ReqToTokenPool(4, 16, torch.device("cpu")), ReqToTokenPool(4, 16, torch.device("cpu"))
    src.journal = []
    src.write(1, 0, torch.tensor([3, 4, 5]))
    src.write_cells([1, 2], [3, 0], torch.tensor([9, 11]))
    dst.replay(src.take_journal())
    assert torch.equal(dst.req_to_token, src.req_to_token)
    assert src.take_journal() == []


def test_two_nodes_on_one_machine(llama_tiny):
    """--nnodes 2: node 1 runs only its rank (no front end) and joins node 0 at --dist-init-addr."""
    import subprocess
    import sys

    from engine.entrypoints.scheduler_process import free_port

    addr = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen([sys.executable, "-m", "engine.entrypoints.cli", "serve", "--model-path", str(llama_tiny),
                              "--device", "cpu", "--tp", "2", "--nnodes", "2", "--node-rank", "1",
                              "--dist-init-addr", addr, "--max-total-tokens", "4096"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        got = _generate(llama_tiny, 2, nnodes=2, node_rank=0, dist_init_addr=addr)
        assert got == _generate(llama_tiny, 1)
        # node 0 is gone: node 1's rank loses its peer and the command ends
        out, _ = node1.communicate(timeout=60)
        assert "node 1 of 2" in out, out
    finally:
        if node1.poll() is None:
            node1.kill()


def test_served_with_tp2(llama_tiny):
    """`anyserve serve --tp 2`: two scheduler processes; answers match one rank; all gone at stop."""
    import httpx
    from server_fixture import running_server

    body = {"text": "hello there", "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    texts = []
    for tp, n in ((1, 1), (2, 2)):
        with running_server(llama_tiny, "--tp", str(tp), "--max-total-tokens", "2048", "--grpc-port", "0",
                            num_schedulers=n) as srv:
            r = httpx.post(srv.base_url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["text"])
    assert texts[0] == texts[1]
