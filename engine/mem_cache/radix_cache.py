"""RadixCache: a radix tree over token ids whose nodes own KV slots (RadixAttention).

Keys are matched and stored in whole pages. A node locked by a running request (and its
ancestors) is never evicted; unlocked leaves are evicted least-recently-used first.
"""
from __future__ import annotations

import heapq
import time
from typing import Optional

import torch

from engine.mem_cache.allocator import PagedAllocator


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access_time")

    def __init__(self, parent: Optional["TreeNode"] = None) -> None:
        self.children: dict[tuple, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = []
        self.value: Optional[torch.Tensor] = None  # [len(key)] int64 KV slots
        self.lock_ref = 0
        self.last_access_time = time.monotonic()

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access_time < other.last_access_time


class RadixCache:
    def __init__(self, allocator: PagedAllocator, page_size: int, device: torch.device) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.device = device
        self.num_evicted_tokens = 0
        self.reset()

    # -- bookkeeping ---------------------------------------------------------------------
    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.root.value = torch.empty(0, dtype=torch.int64, device=self.device)
        self._evictable = 0
        self._protected = 0

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def _child_key(self, key: list[int], start: int = 0) -> tuple:
        return tuple(key[start: start + self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        """Length of the common prefix of a and b, in whole pages."""
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i - i % self.page_size

    # -- match / insert --------------------------------------------------------------------
    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """KV slots of the longest cached page-aligned prefix of key, and its last node."""
        key = key[: len(key) - len(key) % self.page_size]
        node = self.root
        values = []
        now = time.monotonic()
        pos = 0
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
                values.append(child.value)
                node = child
                break
            values.append(child.value)
            node = child
            pos += n
        if not values:
            return self.root.value, node
        return torch.cat(values), node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split child after n tokens; return the new upper node (holding key[:n])."""
        upper = TreeNode(child.parent)
        upper.key, upper.value = child.key[:n], child.value[:n]
        upper.lock_ref = child.lock_ref
        upper.last_access_time = child.last_access_time
        upper.children = {self._child_key(child.key, n): child}
        child.parent.children[self._child_key(upper.key)] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert page-aligned key -> value. Returns how many leading tokens were already
        cached (the caller frees its own slots for those: the tree keeps its copy)."""
        assert len(key) % self.page_size == 0 and len(key) == value.numel()
        node = self.root
        now = time.monotonic()
        pos = 0
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                new = TreeNode(node)
                new.key, new.value = list(key[pos:]), value[pos:].clone()
                new.last_access_time = now
                node.children[self._child_key(new.key)] = new
                self._evictable += len(new.key)
                return pos
            child.last_access_time = now
            n = self._match_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            pos += n
        return pos

    # -- locks -----------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "radix cache lock released twice"
            node = node.parent

    # -- eviction --------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves (LRU first), if there are
        that many. Returns the number freed."""
        leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        self.num_evicted_tokens += freed
        return freed

    def _iter_nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())

    # -- request life cycle ----------------------------------------------------------------
    def cache_req(self, token_ids: list[int], slots: torch.Tensor, prefix_len: int,
                  last_node: TreeNode, keep_locked: bool) -> Optional[tuple[torch.Tensor, TreeNode]]:
        """Hand a request's computed KV (``slots`` for ``token_ids``) to the tree.

        ``prefix_len`` leading slots already belong to the tree (locked at ``last_node``).
        Pages the tree already holds are freed from the request; with ``keep_locked`` the
        request keeps using the tree's copy (returned as new prefix slots and node), else its
        lock is released and the trailing partial page freed.
        """
        aligned = len(token_ids) - len(token_ids) % self.page_size
        present = self.insert(token_ids[:aligned], slots[:aligned])
        if present > prefix_len:
            self.allocator.free(slots[prefix_len:present])
        if not keep_locked:
            self.allocator.free(slots[aligned:])
            self.dec_lock_ref(last_node)
            return None
        new_slots, new_node = self.match_prefix(token_ids[:aligned])
        self.inc_lock_ref(new_node)
        self.dec_lock_ref(last_node)
        return new_slots, new_node

    def pretty(self) -> str:
        lines = []

        def walk(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                lines.append(f"{'  ' * depth}{child.key[:8]}{'...' if len(child.key) > 8 else ''} "
                             f"len={len(child.key)} lock={child.lock_ref}")
                walk(child, depth + 1)

        walk(self.root, 0)
        return "\n".join(lines)


class ChunkCache:
    """--disable-radix-cache: the same interface, nothing shared between requests."""

    def __init__(self, allocator: PagedAllocator, page_size: int, device: torch.device) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.device = device
        self.num_evicted_tokens = 0
        self.root = None
        self._empty = torch.empty(0, dtype=torch.int64, device=device)

    def reset(self) -> None:
        pass

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, None]:
        return self._empty, None

    def inc_lock_ref(self, node) -> None:
        pass

    def dec_lock_ref(self, node) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def cache_req(self, token_ids: list[int], slots: torch.Tensor, prefix_len: int, last_node,
                  keep_locked: bool):
        if keep_locked:
            return None
        self.allocator.free(slots)
        return None
