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
from engine.runner.model_loader import iterate_safetensors
from engine.sampling.sampling_params import SamplingParams
from engine.server_args import ServerArgs

PROMPTS = [[5 + i, 17, 33 + i, 99, 4, 250 + 3 * i] * (i + 1) for i in range(6)] + [[7] * 40, [7] * 40 + [9, 10]]


def _generate(model_path, tp: int, max_new_tokens: int = 24, device: str = "cpu", **kw) -> dict[str, list[int]]:
    args = ServerArgs(model_path=str(model_path), device=device, tp_size=tp, max_total_tokens=4096,
                      log_level="warning", **kw)
    client = ProcessSchedulerClient(args, startup_timeout=180)
    try:
        out: queue.Queue = queue.Queue()
        client.start(out.put)
        params = SamplingParams.from_dict({"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True})
        for i, p in enumerate(PROMPTS):
            client.send(TokenizedGenerateReq(rid=str(i), input_ids=p, sampling_params=params))
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
        done: set[str] = set()
        while len(done) < len(PROMPTS):
            o = out.get(timeout=120)
            assert isinstance(o, BatchTokenOutput), o
            for rid, ids, fin in zip(o.rids, o.new_token_ids, o.finished_reasons):
                tokens[rid] += ids
                if fin:
                    assert fin["type"] == "length", fin
                    done.add(rid)
        return tokens
    finally:
        client.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tp2_greedy_tokens_equal_tp1(make_tiny, arch):
    # two safetensors shards: the index path and lazy (sliced) reads together
    path = make_tiny(arch, num_shards=2)
    one = _generate(path, 1)
    two = _generate(path, 2)
    assert all(len(v) == 24 for v in one.values())
    assert two == one


def test_tp2_with_the_overlap_scheduler(llama_tiny, monkeypatch):
    """Overlap on (as on GPUs): rank 0 feeds tokens still on the device, the other ranks take
    them from their own future slots, filled by rank 0's broadcast after each sampling."""
    monkeypatch.setenv("ANYSERVE_OVERLAP", "1")     # inherited by the spawned ranks
    overlapped = _generate(llama_tiny, 2)
    monkeypatch.delenv("ANYSERVE_OVERLAP")
    assert overlapped == _generate(llama_tiny, 1)


def test_tp4_replicates_kv_heads_and_chunked_prefill(llama_tiny):
    # tiny has 2 KV heads: with 4 ranks each keeps a copy of one; chunked prefill and the radix
    # cache (the last two prompts share 40 tokens) exercise the req_to_token journal.
    kw = dict(chunked_prefill_size=16)
    assert _generate(llama_tiny, 4, max_new_tokens=12, **kw) == _generate(llama_tiny, 1, max_new_tokens=12, **kw)


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
