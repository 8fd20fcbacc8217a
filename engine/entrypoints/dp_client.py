"""Data parallelism inside one server (``--dp N``): N scheduler replicas, each with its own
model copy and KV cache, behind one SchedulerClient that routes every request to one of them.

The TokenizerManager sees one scheduler: requests are routed by a load balancer
(--load-balance-method; cache_aware keys on the prompt's token ids), aborts go to the
replica that owns the request, and flush-cache / stats requests are broadcast and their N
replies merged into one, in the order the callers asked.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Optional

from engine.entrypoints.scheduler_client import OnOutput, SchedulerClient
from engine.io_struct import (AbortReq, BatchTokenOutput, FlushCacheOutput, FlushCacheReq, GetStatsReq,
                              SchedulerError, SchedulerInfo, SchedulerStats, SpecCounts, StepTotals,
                              TokenizedGenerateReq)
from engine.router.policy import LoadBalancer, make_load_balancer
from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)

# broadcast request -> the reply type each replica answers it with
_BROADCAST_REPLY = {FlushCacheReq: FlushCacheOutput, GetStatsReq: SchedulerStats}


def merge_stats(replies: list[SchedulerStats]) -> SchedulerStats:
    """One SchedulerStats for the whole server: counts and capacities add up; the cache hit
    rate and token usage are recomputed from the summed raw numbers, not averaged."""
    cap = sum(s.max_total_tokens for s in replies)
    used = sum(s.token_usage * s.max_total_tokens for s in replies)
    prompt = sum(s.prompt_tokens_total for s in replies)
    cached = sum(s.cached_tokens_total for s in replies)
    return SchedulerStats(
        num_running_reqs=sum(s.num_running_reqs for s in replies),
        num_queue_reqs=sum(s.num_queue_reqs for s in replies),
        token_usage=used / max(1, cap), cache_hit_rate=cached / max(1, prompt), max_total_tokens=cap,
        available_tokens=sum(s.available_tokens for s in replies),
        evictable_tokens=sum(s.evictable_tokens for s in replies),
        num_retractions=sum(s.num_retractions for s in replies),
        num_evicted_tokens=sum(s.num_evicted_tokens for s in replies),
        gen_throughput=sum(s.gen_throughput for s in replies),
        prompt_tokens_total=prompt, cached_tokens_total=cached,
        step_totals=sum((s.step_totals for s in replies), StepTotals()), replicas=list(replies),
        spec=sum((s.spec for s in replies), SpecCounts()) if replies and replies[0].spec is not None else None)


def merge_flush(replies: list[FlushCacheOutput]) -> FlushCacheOutput:
    """Flushed only if every replica flushed (a busy replica refuses)."""
    refused = [f"replica {i}: {r.message}" if r.message else f"replica {i}"
               for i, r in enumerate(replies) if not r.success]
    return FlushCacheOutput(success=not refused, message="; ".join(refused))


_MERGE: dict[type, Callable[[list], Any]] = {SchedulerStats: merge_stats, FlushCacheOutput: merge_flush}


class DataParallelClient(SchedulerClient):
    """N replica clients behind one. Thread-safe: requests are sent from the event loop while
    each replica's outputs arrive on its own reader thread."""

    def __init__(self, replicas: list[SchedulerClient], balancer: LoadBalancer) -> None:
        if not replicas:
            raise ValueError("DataParallelClient needs at least one replica")
        self.replicas = replicas
        self.balancer = balancer
        # A prompt must fit one replica, so the server's capacity is the smallest replica's.
        self.info: SchedulerInfo = dataclasses.replace(
            replicas[0].info, max_total_tokens=min(r.info.max_total_tokens for r in replicas))
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}                    # rid -> replica, while in flight
        self.in_flight = [0] * len(replicas)
        # per reply type, the broadcasts still waiting for replies (oldest first); each
        # replica answers its own messages in order, so its k-th reply fills the k-th slot
        self._gathers: dict[type, collections.deque[list[Optional[Any]]]] = {
            t: collections.deque() for t in _MERGE}
        self._on_output: Optional[OnOutput] = None

    def start(self, on_output: OnOutput) -> None:
        self._on_output = on_output
        for i, replica in enumerate(self.replicas):
            replica.start(lambda obj, i=i: self._on_replica_output(i, obj))

    # -- front end -> replicas -----------------------------------------------------------------
    def send(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            self.replicas[self._route(msg)].send(msg)
        elif isinstance(msg, AbortReq):
            self._send_abort(msg)
        elif type(msg) in _BROADCAST_REPLY:
            with self._lock:
                self._gathers[_BROADCAST_REPLY[type(msg)]].append([None] * len(self.replicas))
            for replica in self.replicas:
                replica.send(msg)
        else:
            raise TypeError(f"the data-parallel client does not know how to route a "
                            f"{type(msg).__name__}: add it to engine/entrypoints/dp_client.py")

    def _route(self, req: TokenizedGenerateReq) -> int:
        key = tuple(req.input_ids)      # once here, not once per replica's tree
        with self._lock:
            alive = [r.is_alive() for r in self.replicas]
            i = self.balancer.pick(key, self.in_flight, alive)
            self.balancer.on_routed(i, key)
            self._owner[req.rid] = i
            self.in_flight[i] += 1
        return i

    def _send_abort(self, msg: AbortReq) -> None:
        if msg.abort_all or msg.rid is None:
            for replica in self.replicas:
                replica.send(msg)
            return
        with self._lock:
            owner = self._owner.get(msg.rid)
        if owner is not None:       # unknown: already finished, nothing to abort
            self.replicas[owner].send(msg)

    # -- replicas -> front end -----------------------------------------------------------------
    def _on_replica_output(self, i: int, obj: Any) -> None:
        assert self._on_output is not None
        if isinstance(obj, BatchTokenOutput):
            with self._lock:
                for rid, reason in zip(obj.rids, obj.finished_reasons):
                    if reason is not None and self._owner.pop(rid, None) is not None:
                        self.in_flight[i] -= 1
        elif isinstance(obj, SchedulerError):
            obj = SchedulerError(f"data-parallel replica {i}: {obj.message}")
        elif type(obj) in _MERGE:
            obj = self._gather_reply(i, obj)
            if obj is None:
                return
        self._on_output(obj)

    def _gather_reply(self, i: int, reply: Any) -> Optional[Any]:
        """Store replica i's reply; the merged reply once the oldest broadcast is complete."""
        with self._lock:
            pending = self._gathers[type(reply)]
            slot = next((g for g in pending if g[i] is None), None)
            if slot is None:
                logger.warning("replica %d sent a %s nobody asked for", i, type(reply).__name__)
                return None
            slot[i] = reply
            if pending[0] is not slot or any(r is None for r in slot):
                return None
            pending.popleft()
        return _MERGE[type(reply)](slot)

    # -- lifetime ------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        """All replicas: a server missing one would silently lose the requests routed to it."""
        return all(r.is_alive() for r in self.replicas)

    def shutdown(self) -> None:
        _in_threads([r.shutdown for r in self.replicas], "shut down")


def _in_threads(calls: list[Callable[[], Any]], what: str) -> list[Any]:
    """Run the calls concurrently; their results in order, or the first failure raised (after
    all have ended) naming the replica."""
    results: list[Any] = [None] * len(calls)
    errors: list[tuple[int, BaseException]] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below, with the replica's index
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,), name=f"anyserve-dp-{i}", daemon=True)
               for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        i, e = min(errors, key=lambda x: x[0])
        raise RuntimeError(f"data-parallel replica {i} failed to {what}: {e}") from e
    return results


def replica_args(args: ServerArgs, rank: int) -> ServerArgs:
    """Replica `rank`'s arguments: its own devices after the previous replicas' tensor-parallel
    groups, dp_size 1 (a replica never nests), its own seed so that replicas do not draw the
    same random numbers (the n samples of one prompt may land on different replicas), and its
    own tensor-parallel meeting point (replica 0 keeps --dist-init-addr, the others take a
    free local port)."""
    return dataclasses.replace(args, dp_size=1, base_gpu_id=args.base_gpu_id + rank * args.tp_size,
                               random_seed=args.random_seed + rank,
                               dist_init_addr=args.dist_init_addr if rank == 0 else None)


def make_scheduler_client(args: ServerArgs, kind: str = "process") -> SchedulerClient:
    """The scheduler client for these arguments: one scheduler (a "process" over ZeroMQ or a
    "thread" of this process), or with --dp N a DataParallelClient of N of them, started
    concurrently since each waits for its model to load."""
    from engine.entrypoints.scheduler_client import ThreadSchedulerClient
    from engine.entrypoints.scheduler_process import ProcessSchedulerClient

    kinds = {"process": ProcessSchedulerClient, "thread": ThreadSchedulerClient}
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    # tensor-parallel ranks are processes: their rank 0 cannot be a thread of this one
    cls = kinds["process" if args.tp_size > 1 else kind]
    if args.dp_size == 1:
        return cls(args)
    n = args.dp_size
    logger.info("data parallel: %d replicas, load balancing %s", n, args.load_balance_method)
    balancer = make_load_balancer(
        args.load_balance_method, n, balance_abs_threshold=args.router_balance_abs_threshold,
        balance_rel_threshold=args.router_balance_rel_threshold,
        cache_threshold=args.router_cache_threshold, max_tree_size=args.router_max_tree_size)
    started: list[Optional[SchedulerClient]] = [None] * n

    def start(rank: int) -> SchedulerClient:
        kw = {"name": f"anyserve-dp{rank}"} if cls is ProcessSchedulerClient else {}  # log names
        started[rank] = cls(replica_args(args, rank), **kw)
        return started[rank]

    try:
        replicas = _in_threads([lambda rank=rank: start(rank) for rank in range(n)], "start")
    except BaseException:
        _in_threads([c.shutdown for c in started if c is not None], "shut down")
        raise
    return DataParallelClient(replicas, balancer)
