"""Order of the waiting queue: lpm, fcfs, dfs-weight, lof, random."""
from __future__ import annotations

import random
from collections import defaultdict

from engine.scheduler.req import Req

# lpm needs a tree walk per waiting request; past this many, fall back to fcfs (as SGLang does).
_LPM_MAX_QUEUE = 128


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache, seed: int = 0) -> None:
        self.policy = policy
        self.tree_cache = tree_cache
        self.rng = random.Random(seed)

    def sort(self, waiting: list[Req]) -> list[Req]:
        """Return the waiting queue in the order to admit. Retracted requests go first."""
        policy = self.policy
        if self.tree_cache.root is None and policy in ("lpm", "dfs-weight"):
            policy = "fcfs"  # nothing cached: prefix length means nothing
        if policy == "lpm" and len(waiting) > _LPM_MAX_QUEUE:
            policy = "fcfs"
        if policy == "fcfs":
            out = sorted(waiting, key=lambda r: r.arrival_time)
        elif policy == "lof":
            out = sorted(waiting, key=lambda r: (-self._output_budget(r), r.arrival_time))
        elif policy == "random":
            out = list(waiting)
            self.rng.shuffle(out)
        elif policy == "lpm":
            lens = {id(r): self._prefix_len(r) for r in waiting}
            out = sorted(waiting, key=lambda r: (-lens[id(r)], r.arrival_time))
        elif policy == "dfs-weight":
            out = self._dfs_weight(waiting)
        else:
            raise ValueError(f"unknown schedule policy {policy!r}")
        return sorted(out, key=lambda r: r.num_retractions == 0)  # stable: retracted first

    @staticmethod
    def _output_budget(req: Req) -> float:
        """Tokens the request may still generate (no max_new_tokens: unbounded, first)."""
        p = req.params.max_new_tokens
        return float("inf") if p is None else p - len(req.output_ids)

    def _prefix_len(self, req: Req) -> int:
        ids = req.fill_ids
        slots, _ = self.tree_cache.match_prefix(ids[: len(ids) - 1])
        return int(slots.numel())

    def _dfs_weight(self, waiting: list[Req]) -> list[Req]:
        """Visit the tree depth first, heaviest subtree (most waiting requests) first, so
        requests sharing a prefix run together."""
        by_node: dict[int, list[Req]] = defaultdict(list)
        nodes = {}
        for r in waiting:
            ids = r.fill_ids
            _, node = self.tree_cache.match_prefix(ids[: len(ids) - 1])
            by_node[id(node)].append(r)
            nodes[id(node)] = node
        weight: dict[int, int] = defaultdict(int)
        for nid, reqs in by_node.items():
            node = nodes[nid]
            while node is not None:
                weight[id(node)] += len(reqs)
                node = node.parent
        out: list[Req] = []

        def visit(node) -> None:
            out.extend(sorted(by_node.get(id(node), []), key=lambda r: r.arrival_time))
            for child in sorted(node.children.values(), key=lambda c: -weight.get(id(c), 0)):
                if weight.get(id(child), 0):
                    visit(child)

        visit(self.tree_cache.root)
        return out
