"""An approximate radix tree of the prompts routed to one worker: the router's guess of what
that worker's prefix cache holds.

It owns no KV and never hears from the worker, so it is only an estimate: it grows with every
prompt routed there and forgets the least recently routed branches beyond a size bound. Keys
are any sequence of hashable items: token ids (the in-process data-parallel router) or
characters (the HTTP router, which routes on text).
"""
from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Optional, Sequence

Key = Sequence[Hashable]


def _as_key(key: Key) -> Sequence[Hashable]:
    """Strings stay strings (slices are cheap and compare in C); anything else becomes a tuple,
    so stored edges never alias a caller's mutable list."""
    return key if isinstance(key, (str, tuple)) else tuple(key)


def _common_prefix_len(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the common prefix of a and b. Slice comparison runs in C, so the usual case
    (one edge matched whole) costs one comparison and a mismatch costs a binary search."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1       # a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    __slots__ = ("edge", "children", "parent", "last_access")

    def __init__(self, edge: Sequence[Hashable], parent: Optional["_Node"], last_access: int) -> None:
        self.edge = edge                        # the items on the edge from parent to this node
        self.children: dict[Hashable, _Node] = {}   # keyed by the first item of the child's edge
        self.parent = parent
        self.last_access = last_access          # insert tick; a parent's is >= any child's


class ApproxRadixTree:
    """Longest-prefix match, insert, and least-recently-inserted trimming to a bound.

    `size` counts the items stored (shared prefixes once). `insert` refreshes the whole path of
    the key, so a parent is never older than its children and trimming leaves in age order is
    LRU. When an insert pushes `size` past `max_size`, leaves are removed down to
    `trim_to` (90% of the bound by default) so that the trimming cost is paid once per tenth
    of the bound, not on every insert.
    """

    def __init__(self, max_size: int, trim_to: Optional[int] = None) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.trim_to = max_size - max_size // 10 if trim_to is None else min(trim_to, max_size)
        self._clock = itertools.count(1)
        self.clear()

    def clear(self) -> None:
        self.root = _Node((), None, 0)
        self.size = 0

    def match_prefix(self, key: Key) -> int:
        """How many leading items of key the tree holds (read-only: ages nothing)."""
        key = _as_key(key)
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(child.edge, key[pos:pos + len(child.edge)])
            pos += n
            if n < len(child.edge):
                break
            node = child
        return pos

    def insert(self, key: Key) -> None:
        """Add key (refreshing its whole path), then trim if the bound is exceeded."""
        key = _as_key(key)
        now = next(self._clock)
        node, pos = self.root, 0
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                node.children[key[pos]] = _Node(key[pos:], node, now)
                self.size += len(key) - pos
                break
            n = _common_prefix_len(child.edge, key[pos:pos + len(child.edge)])
            if n < len(child.edge):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        if self.size > self.max_size:
            self.trim(self.trim_to)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n items; the new middle node is returned."""
        parent = child.parent
        mid = _Node(child.edge[:n], parent, child.last_access)
        parent.children[mid.edge[0]] = mid
        child.edge = child.edge[n:]
        child.parent = mid
        mid.children[child.edge[0]] = child
        return mid

    def trim(self, target: int) -> int:
        """Remove least recently inserted leaves until size <= target; returns items removed."""
        if self.size <= target:
            return 0
        tie = itertools.count()     # nodes do not compare; equal ticks pop in discovery order
        heap = [(n.last_access, next(tie), n) for n in self._leaves()]
        heapq.heapify(heap)
        removed = 0
        while self.size > target and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            removed += len(leaf.edge)
            if not parent.children and parent is not self.root:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return removed

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out
