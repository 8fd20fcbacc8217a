"""Data parallelism inside one server (--dp N, engine/entrypoints/dp_client.py): routing,
aborts and merged replies over fake replicas; then real replicas: the offline Engine with
dp_size=2, and `anyserve serve --dp 2` where cache_aware keeps each shared-prefix group on
one replica and beats round_robin's cache hit rate."""
from __future__ import annotations

import contextlib
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.entrypoints.dp_client import DataParallelClient, make_scheduler_client, replica_args
from engine.entrypoints.scheduler_client import SchedulerClient
from engine.io_struct import (AbortReq, BatchTokenOutput, FlushCacheOutput, FlushCacheReq, GetStatsReq,
                              SchedulerError, SchedulerInfo, SchedulerStats, TokenizedGenerateReq)
from engine.router.policy import make_load_balancer
from engine.sampling.sampling_params import SamplingParams
from engine.server_args import ServerArgs
from server_fixture import ServerProcess, metric, running_server


class FakeReplica(SchedulerClient):
    """Records what it is sent; the test plays the scheduler by calling `emit`."""

    def __init__(self, max_total_tokens: int = 1000) -> None:
        self.info = SchedulerInfo(max_total_tokens=max_total_tokens, max_running_requests=8, context_length=512,
                                  vocab_size=100, device="cpu", dtype="float32", attention_backend="torch",
                                  sampling_backend="torch")
        self.sent: list = []
        self.alive = True
        self.emit = None

    def start(self, on_output) -> None:
        self.emit = on_output

    def send(self, msg) -> None:
        self.sent.append(msg)

    def is_alive(self) -> bool:
        return self.alive

    def shutdown(self) -> None:
        self.alive = False


def _dp(n: int = 2, method: str = "round_robin", **caps):
    replicas = [FakeReplica(**caps) for _ in range(n)]
    out: list = []
    client = DataParallelClient(replicas, make_load_balancer(method, n))
    client.start(out.append)
    return client, replicas, out


def _req(rid: str, ids: list[int]) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid, ids, SamplingParams())


def _finish(rids: list[str], done: list[bool]) -> BatchTokenOutput:
    n = len(rids)
    return BatchTokenOutput(rids, [[1]] * n, [{"type": "length"} if d else None for d in done], [3] * n, [1] * n,
                            [0] * n)


def _stats(running: int, cap: int, used: int, prompt: int, cached: int) -> SchedulerStats:
    return SchedulerStats(num_running_reqs=running, num_queue_reqs=1, token_usage=used / cap,
                          cache_hit_rate=cached / max(1, prompt), max_total_tokens=cap,
                          available_tokens=cap - used, evictable_tokens=0, prompt_tokens_total=prompt,
                          cached_tokens_total=cached)


# ---- the client over fake replicas ---------------------------------------------------------------
def test_info_takes_the_smallest_replicas_capacity():
    replicas = [FakeReplica(1000), FakeReplica(600)]
    client = DataParallelClient(replicas, make_load_balancer("round_robin", 2))
    assert client.info.max_total_tokens == 600
    assert client.info.context_length == 512


def test_requests_are_routed_and_counted_until_they_finish():
    client, (r0, r1), out = _dp(method="shortest_queue")
    for k in range(4):
        client.send(_req(f"r{k}", [1, 2, 3]))
    assert [m.rid for m in r0.sent] + [m.rid for m in r1.sent] and client.in_flight == [2, 2]
    owner = {m.rid: 0 for m in r0.sent} | {m.rid: 1 for m in r1.sent}
    first = next(rid for rid, o in owner.items() if o == 0)
    r0.emit(_finish([first], [True]))
    assert client.in_flight == [1, 2]
    assert out and out[-1].rids == [first]         # outputs pass through unchanged
    r0.emit(_finish([first], [True]))               # a repeated finish is not counted twice
    assert client.in_flight == [1, 2]
    client.send(_req("r4", [1, 2, 3]))              # the least loaded replica now is 0
    assert r0.sent[-1].rid == "r4"


def test_abort_goes_to_the_owner_and_abort_all_to_every_replica():
    client, (r0, r1), _ = _dp()
    client.send(_req("a", [1]))
    client.send(_req("b", [2]))
    owner_of_b = r1 if r1.sent and r1.sent[-1].rid == "b" else r0
    client.send(AbortReq(rid="b"))
    assert isinstance(owner_of_b.sent[-1], AbortReq) and owner_of_b.sent[-1].rid == "b"
    assert sum(isinstance(m, AbortReq) for m in r0.sent + r1.sent) == 1
    client.send(AbortReq(rid="unknown"))            # finished or never seen: nobody to tell
    assert sum(isinstance(m, AbortReq) for m in r0.sent + r1.sent) == 1
    client.send(AbortReq(abort_all=True))
    assert isinstance(r0.sent[-1], AbortReq) and r0.sent[-1].abort_all
    assert isinstance(r1.sent[-1], AbortReq) and r1.sent[-1].abort_all


def test_stats_replies_are_merged_in_order_from_raw_counts():
    client, (r0, r1), out = _dp()
    client.send(GetStatsReq())
    client.send(GetStatsReq())
    assert isinstance(r0.sent[-1], GetStatsReq) and isinstance(r1.sent[-1], GetStatsReq)
    # replies of the two asks arrive interleaved; replica 1 answers its first ask last
    r0.emit(_stats(running=1, cap=100, used=50, prompt=100, cached=90))     # ask 1
    r0.emit(_stats(running=7, cap=100, used=0, prompt=0, cached=0))         # ask 2
    assert out == []
    r1.emit(_stats(running=2, cap=300, used=30, prompt=900, cached=0))      # ask 1: complete
    assert len(out) == 1
    merged = out[0]
    assert merged.num_running_reqs == 3 and merged.num_queue_reqs == 2
    assert merged.max_total_tokens == 400
    assert merged.token_usage == pytest.approx(80 / 400)
    # from the summed counts (90 / 1000), not the mean of 0.9 and 0.0
    assert merged.cache_hit_rate == pytest.approx(0.09)
    assert [s.num_running_reqs for s in merged.replicas] == [1, 2]
    r1.emit(_stats(running=1, cap=300, used=0, prompt=0, cached=0))         # ask 2
    assert len(out) == 2 and out[1].num_running_reqs == 8


def test_flush_succeeds_only_if_every_replica_flushed():
    client, (r0, r1), out = _dp()
    client.send(FlushCacheReq())
    r0.emit(FlushCacheOutput(True))
    r1.emit(FlushCacheOutput(False, "requests are running"))
    assert len(out) == 1 and not out[0].success and "replica 1" in out[0].message
    client.send(FlushCacheReq())
    r1.emit(FlushCacheOutput(True))
    r0.emit(FlushCacheOutput(True))
    assert out[1].success


def test_a_replica_error_is_forwarded_and_the_client_is_not_alive():
    client, (r0, r1), out = _dp()
    assert client.is_alive()
    r1.alive = False
    r1.emit(SchedulerError("the scheduler process exited with code -9"))
    assert isinstance(out[-1], SchedulerError) and out[-1].message.startswith("data-parallel replica 1:")
    assert not client.is_alive()


def test_unknown_messages_are_refused_by_name():
    client, _, _ = _dp()
    with pytest.raises(TypeError, match="dict"):
        client.send({"not": "a message"})


def test_replica_args_give_each_replica_its_devices_and_seed():
    args = ServerArgs(tp_size=2, dp_size=3, base_gpu_id=1, random_seed=5, dist_init_addr="127.0.0.1:29500")
    got = [replica_args(args, r) for r in range(3)]
    assert [a.base_gpu_id for a in got] == [1, 3, 5]
    assert [a.random_seed for a in got] == [5, 6, 7]
    assert [a.dist_init_addr for a in got] == ["127.0.0.1:29500", None, None]
    assert all(a.dp_size == 1 and a.tp_size == 2 for a in got)


def test_a_replica_failing_to_start_stops_the_others(monkeypatch):
    import engine.entrypoints.scheduler_client as sc

    started: list = []

    class Flaky(FakeReplica):
        def __init__(self, args: ServerArgs) -> None:
            if args.base_gpu_id == 1:
                raise RuntimeError("out of memory")
            super().__init__()
            started.append(self)

    monkeypatch.setattr(sc, "ThreadSchedulerClient", Flaky)
    with pytest.raises(RuntimeError, match="replica 1 failed to start: out of memory"):
        make_scheduler_client(ServerArgs(dp_size=2), "thread")
    assert len(started) == 1 and not started[0].alive


# ---- real replicas -----------------------------------------------------------------------------
def test_engine_with_two_replicas(llama_tiny, monkeypatch):
    from engine import Engine

    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the replicas' torch threads on a small machine
    prompt = list(range(5, 45))
    params = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 8}
    with Engine(model_path=str(llama_tiny), device="cpu", dp_size=2, max_total_tokens=512,
                load_balance_method="round_robin") as eng:
        outs = [eng.generate(input_ids=prompt, sampling_params=params) for _ in range(2)]
        stats = eng.get_stats()
        assert eng.flush_cache()
    # round robin ran the prompt once on each replica: same weights, same greedy tokens
    assert outs[0]["output_ids"] == outs[1]["output_ids"] and len(outs[0]["output_ids"]) == 8
    assert [r.prompt_tokens_total for r in stats.replicas] == [40, 40]
    assert stats.prompt_tokens_total == 80 and stats.max_total_tokens == 1024


GROUPS, PER_GROUP = 4, 4
_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega").split()


def _group_prefixes() -> list[str]:
    rng = random.Random(0)
    return [f"Group {g}: " + " ".join(rng.choice(_WORDS) for _ in range(60)) for g in range(GROUPS)]


@contextlib.contextmanager
def dp_server(model, method: str):
    """`anyserve serve --dp 2`: two scheduler processes behind the front end's router."""
    with running_server(model, "--dp", "2", "--load-balance-method", method, "--max-total-tokens", "2048",
                        "--grpc-port", "0", num_schedulers=2) as srv:
        yield srv


def _run_groups(srv: ServerProcess) -> tuple[list[list[dict]], float, str]:
    """Round r sends one request per group, groups rotated by r, one at a time: with round_robin
    (which alternates replicas) group g lands on replica (g - r) % 2, i.e. on both. Returns the
    meta_info per group (in round order), the cache hit rate and the metrics text."""
    prefixes = _group_prefixes()
    metas: list[list[dict]] = [[] for _ in range(GROUPS)]
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        for r in range(PER_GROUP):
            for pos in range(GROUPS):
                g = (pos + r) % GROUPS
                out = c.post("/generate", json={"text": f"{prefixes[g]} Question {r}?",
                                                "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}})
                assert out.status_code == 200, out.text
                metas[g].append(out.json()["meta_info"])
        text = c.get("/metrics").text
    return metas, metric(text, "anyserve:cache_hit_rate"), text


def test_cache_aware_keeps_groups_on_one_replica_and_beats_round_robin(llama_tiny):
    with dp_server(llama_tiny, "cache_aware") as srv:
        aware, aware_rate, text = _run_groups(srv)
        assert 'anyserve:replica_cache_hit_rate{dp_rank="0"}' in text
        assert 'anyserve:replica_cache_hit_rate{dp_rank="1"}' in text
        # under concurrency too, every request finds its group's prefix on its replica
        prefixes = _group_prefixes()
        with httpx.Client(base_url=srv.base_url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda k: c.post("/generate", json={
                "text": f"{prefixes[k % GROUPS]} Later question {k}?",
                "sampling_params": {"max_new_tokens": 2}}).json()["meta_info"], range(2 * GROUPS)))
    with dp_server(llama_tiny, "round_robin") as srv:
        robin, robin_rate, _ = _run_groups(srv)

    for g in range(GROUPS):
        prompt = aware[g][0]["prompt_tokens"]
        # all but the first request of a group found the group's prefix (the prompt less its
        # few distinct last tokens): they went to the first one's replica
        assert all(m["cached_tokens"] >= prompt - 8 for m in aware[g][1:]), (g, aware[g])
        # round robin put the group on both replicas: one later request missed the prefix
        assert sum(m["cached_tokens"] < prompt // 2 for m in robin[g]) == 2, (g, robin[g])
    assert all(m["cached_tokens"] >= m["prompt_tokens"] - 10 for m in outs), outs
    # Deterministic counts: cache_aware computes each prefix once (12 of 16 requests hit it),
    # round_robin twice (8 of 16): rates near 0.74 and 0.49.
    assert aware_rate > robin_rate + 0.15, (aware_rate, robin_rate)
    assert aware_rate > 0.6
