"""Load balancers that pick a worker (a data-parallel replica or an HTTP server) per request.

All share one interface so the in-process data-parallel client and the HTTP router use the
same code: ``pick(key, loads, alive)`` chooses among the alive workers, ``on_routed`` records
where a request went (after a retry, the worker that really got it), ``remove_worker``
forgets a worker whose cache is gone (it died or was taken out of rotation).

cache_aware keeps one approximate radix tree per worker rather than sglang-router's single
tree with a set of workers per node: trimming a worker to its bound and forgetting a dead
worker are then local operations with exact sizes, and a match costs one walk per worker,
which is cheap for the handful of workers a router fronts.
"""
from __future__ import annotations

import itertools
from typing import Hashable, Sequence

from engine.router.radix_tree import ApproxRadixTree
from engine.server_args import LOAD_BALANCE_METHODS

Key = Sequence[Hashable]


class NoWorkerAvailable(RuntimeError):
    """Every worker is down (or excluded)."""


def _alive_indices(alive: Sequence[bool]) -> list[int]:
    live = [i for i, ok in enumerate(alive) if ok]
    if not live:
        raise NoWorkerAvailable(f"none of the {len(alive)} workers is available")
    return live


class LoadBalancer:
    """Base: `loads[i]` is worker i's requests in flight; `alive[i]` whether it may be used."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers

    def pick(self, key: Key, loads: Sequence[int], alive: Sequence[bool]) -> int:
        raise NotImplementedError

    def on_routed(self, worker: int, key: Key) -> None:
        """The request with `key` was sent to `worker`."""

    def remove_worker(self, worker: int) -> None:
        """Forget what was routed to `worker` (its cache is gone)."""

    def _check(self, loads: Sequence[int], alive: Sequence[bool]) -> list[int]:
        if len(loads) != self.num_workers or len(alive) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} loads and alive flags, got "
                             f"{len(loads)} and {len(alive)}")
        return _alive_indices(alive)


class RoundRobin(LoadBalancer):
    """Cycles over the workers, skipping the dead ones."""

    def __init__(self, num_workers: int) -> None:
        super().__init__(num_workers)
        self._next = 0

    def pick(self, key: Key, loads: Sequence[int], alive: Sequence[bool]) -> int:
        self._check(loads, alive)
        for step in range(self.num_workers):
            i = (self._next + step) % self.num_workers
            if alive[i]:
                self._next = (i + 1) % self.num_workers
                return i
        raise AssertionError("unreachable: _check found an alive worker")


class ShortestQueue(LoadBalancer):
    """Fewest requests in flight; ties rotate so that an idle fleet is still spread."""

    def __init__(self, num_workers: int) -> None:
        super().__init__(num_workers)
        self._tie = itertools.count()

    def pick(self, key: Key, loads: Sequence[int], alive: Sequence[bool]) -> int:
        live = self._check(loads, alive)
        return _least_loaded(live, loads, next(self._tie))


def _least_loaded(live: list[int], loads: Sequence[int], rotation: int = 0) -> int:
    low = min(loads[i] for i in live)
    ties = [i for i in live if loads[i] == low]
    return ties[rotation % len(ties)]


class CacheAware(LoadBalancer):
    """The worker whose tree shares the longest prefix with the key, unless the load is out of
    balance (then the least loaded) or the best match covers less than `cache_threshold` of the
    key (then the worker with the smallest tree: the most room for a new prefix).

    Out of balance means, over the alive workers, max - min > `balance_abs_threshold` and
    max > `balance_rel_threshold` * min: both, so that a few requests on an idle fleet do not
    count, and neither does a uniform heavy load.
    """

    def __init__(self, num_workers: int, *, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.5, cache_threshold: float = 0.5,
                 max_tree_size: int = 1 << 20) -> None:
        super().__init__(num_workers)
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.cache_threshold = cache_threshold
        self.trees = [ApproxRadixTree(max_tree_size) for _ in range(num_workers)]

    def is_imbalanced(self, loads: Sequence[int], live: list[int]) -> bool:
        hi, lo = max(loads[i] for i in live), min(loads[i] for i in live)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def pick(self, key: Key, loads: Sequence[int], alive: Sequence[bool]) -> int:
        live = self._check(loads, alive)
        if self.is_imbalanced(loads, live):
            return _least_loaded(live, loads)
        matched = {i: self.trees[i].match_prefix(key) for i in live}
        # best match; among equal matches the less loaded, then the lower index
        best = min(live, key=lambda i: (-matched[i], loads[i], i))
        if len(key) and matched[best] / len(key) >= self.cache_threshold:
            return best
        return min(live, key=lambda i: (self.trees[i].size, loads[i], i))

    def on_routed(self, worker: int, key: Key) -> None:
        self.trees[worker].insert(key)

    def remove_worker(self, worker: int) -> None:
        self.trees[worker].clear()


def make_load_balancer(method: str, num_workers: int, *, balance_abs_threshold: int = 32,
                       balance_rel_threshold: float = 1.5, cache_threshold: float = 0.5,
                       max_tree_size: int = 1 << 20) -> LoadBalancer:
    """The balancer named by --load-balance-method (thresholds only matter to cache_aware)."""
    if method == "round_robin":
        return RoundRobin(num_workers)
    if method == "shortest_queue":
        return ShortestQueue(num_workers)
    if method == "cache_aware":
        return CacheAware(num_workers, balance_abs_threshold=balance_abs_threshold,
                          balance_rel_threshold=balance_rel_threshold,
                          cache_threshold=cache_threshold, max_tree_size=max_tree_size)
    raise ValueError(f"--load-balance-method must be one of {LOAD_BALANCE_METHODS}, got {method!r}")
