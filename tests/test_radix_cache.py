"""RadixCache and the paged allocator, without a model."""
import random

import pytest
import torch

from engine.mem_cache.allocator import PagedAllocator, ReqToTokenPool
from engine.mem_cache.radix_cache import ChunkCache, RadixCache

CPU = torch.device("cpu")


def make(page_size=1, pages=64):
    alloc = PagedAllocator(pages, page_size, CPU)
    return alloc, RadixCache(alloc, page_size, CPU)


def test_allocator_continues_partial_page():
    alloc = PagedAllocator(8, 4, CPU)
    first = alloc.alloc([0], [6], [-1])
    assert first.numel() == 6
    assert (first[:4] // 4).unique().numel() == 1  # positions 0-3 share one page
    assert int(first[4]) % 4 == 0 and int(first[5]) == int(first[4]) + 1
    more = alloc.alloc([6], [9], [int(first[5])])
    assert more.tolist()[:2] == [int(first[5]) + 1, int(first[5]) + 2]  # fills the page
    assert int(more[2]) % 4 == 0  # then a fresh page
    assert alloc.available_size() == (8 - 3) * 4


def test_allocator_refuses_without_allocating():
    alloc = PagedAllocator(2, 4, CPU)
    assert alloc.alloc([0], [9], [-1]) is None
    assert alloc.available_size() == 8


def test_match_insert_split_and_lock():
    alloc, tree = make()
    a = list(range(10))
    slots = alloc.alloc([0], [10], [-1])
    assert tree.insert(a, slots) == 0
    assert tree.evictable_size() == 10
    got, node = tree.match_prefix(a[:6] + [99, 98])
    assert got.tolist() == slots[:6].tolist()
    tree.inc_lock_ref(node)
    assert tree.protected_size() == 6 and tree.evictable_size() == 4
    assert tree.evict(100) == 4  # only the unlocked tail can go
    tree.dec_lock_ref(node)
    assert tree.evict(100) == 6
    assert alloc.available_size() == 64


@pytest.mark.parametrize("page_size", [1, 4])
def test_page_aligned_matching(page_size):
    alloc, tree = make(page_size)
    key = list(range(1, 11))  # 10 tokens
    aligned = 10 - 10 % page_size
    slots = alloc.alloc([0], [10], [-1])
    tree.insert(key[:aligned], slots[:aligned])
    alloc.free(slots[aligned:]) if aligned < 10 else None
    got, _ = tree.match_prefix(key[:7] + [0, 0, 0])
    assert got.numel() == 7 - 7 % page_size


def test_lru_eviction_order():
    alloc, tree = make()
    for i in range(3):
        key = [100 * (i + 1) + j for j in range(5)]
        tree.insert(key, alloc.alloc([0], [5], [-1]))
    tree.match_prefix([100, 101])  # touch the first: now the most recent
    tree.evict(5)
    assert tree.match_prefix([100, 101, 102])[0].numel() == 3
    assert tree.match_prefix([200, 201])[0].numel() == 0


def test_cache_req_frees_duplicates_and_keeps_accounting():
    alloc, tree = make(page_size=2, pages=32)
    key = list(range(8))
    s1 = alloc.alloc([0], [8], [-1])
    tree.insert(key, s1)
    # a second request computed the same 8 tokens plus 3 more in its own slots
    s2 = alloc.alloc([0], [11], [-1])
    tree.cache_req(key + [50, 51, 52], s2, 0, tree.root, keep_locked=False)
    # its duplicate pages and its partial tail page went back to the allocator
    assert tree.total_size() == 10
    assert alloc.available_size() + tree.total_size() == 64


def test_random_workload_never_leaks():
    rng = random.Random(0)
    alloc, tree = make(page_size=2, pages=40)
    for _ in range(300):
        n = rng.randint(2, 16)
        key = [rng.randint(0, 3) for _ in range(n)]
        prefix, node = tree.match_prefix(key[:-1])
        tree.inc_lock_ref(node)
        need = n - prefix.numel()
        if alloc.available_size() < need + 2:
            tree.evict(need + 2)
        new = alloc.alloc([prefix.numel()], [n], [-1])
        if new is None:
            tree.dec_lock_ref(node)
            continue
        slots = torch.cat([prefix, new])
        tree.cache_req(key, slots, prefix.numel(), node, keep_locked=False)
        assert tree.protected_size() == 0
        assert alloc.available_size() + tree.total_size() == 80


def test_chunk_cache_shares_nothing():
    alloc = PagedAllocator(8, 1, CPU)
    cache = ChunkCache(alloc, 1, CPU)
    slots = alloc.alloc([0], [5], [-1])
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    cache.cache_req([1, 2, 3, 4, 5], slots, 0, None, keep_locked=False)
    assert alloc.available_size() == 8


def test_req_to_token_rows():
    pool = ReqToTokenPool(2, 16, CPU)
    a, b = pool.alloc(), pool.alloc()
    assert pool.alloc() is None
    pool.write(a, 3, torch.tensor([7, 8]))
    assert pool.read(a, 3, 5).tolist() == [7, 8]
    pool.free(b)
    assert pool.available_size() == 1
