"""The router's approximate radix tree and load balancers (engine/router): prefix matching over
token ids and text, the size bound and its LRU order, and each policy's choice of worker."""
from __future__ import annotations

import random

import pytest

from engine.router.policy import CacheAware, NoWorkerAvailable, make_load_balancer
from engine.router.radix_tree import ApproxRadixTree


# ---- tree ------------------------------------------------------------------------------------
def test_match_counts_the_longest_shared_prefix_of_token_ids():
    t = ApproxRadixTree(max_size=1000)
    t.insert([1, 2, 3, 4, 5])
    t.insert([1, 2, 3, 9])
    assert t.match_prefix([1, 2, 3, 4, 5, 6]) == 5
    assert t.match_prefix([1, 2, 3, 9, 9]) == 4
    assert t.match_prefix([1, 2, 7]) == 2
    assert t.match_prefix([7]) == 0
    assert t.match_prefix([]) == 0
    assert t.size == 6          # 1 2 3 shared, then 4 5 and 9


def test_match_on_text_and_a_key_inside_an_edge():
    t = ApproxRadixTree(max_size=1000)
    t.insert("You are a helpful assistant. Say hi")
    assert t.match_prefix("You are a helpful assistant. Say bye") == len("You are a helpful assistant. Say ")
    t.insert("You are")             # ends inside the edge: splits it, adds nothing
    assert t.size == len("You are a helpful assistant. Say hi")
    assert t.match_prefix("You are") == 7
    assert t.match_prefix("Your") == 3


def test_insert_does_not_keep_a_reference_to_the_callers_list():
    t = ApproxRadixTree(max_size=100)
    ids = [1, 2, 3]
    t.insert(ids)
    ids[1] = 99
    assert t.match_prefix([1, 2, 3]) == 3


def test_matches_agree_with_a_brute_force_reference():
    rng = random.Random(0)
    t = ApproxRadixTree(max_size=10 ** 6)
    keys = []
    for _ in range(300):
        base = rng.choice(keys) if keys and rng.random() < 0.7 else []
        key = base[: rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        keys.append(key)
        t.insert(key)
        probe = rng.choice(keys)[: rng.randint(0, 20)] + [rng.randint(0, 3) for _ in range(3)]

        def common(a, b):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n
        assert t.match_prefix(probe) == max(common(probe, k) for k in keys)
    # size counts every distinct (prefix) path item once: the number of distinct non-empty prefixes
    assert t.size == len({tuple(k[:n]) for k in keys for n in range(1, len(k) + 1)})


def test_trim_keeps_size_within_the_bound():
    rng = random.Random(1)
    t = ApproxRadixTree(max_size=200)
    for _ in range(500):
        t.insert([rng.randint(0, 9) for _ in range(rng.randint(1, 40))])
        assert t.size <= 200
    assert t.size >= t.trim_to - 40       # trimming stops near its target, not at zero


def test_trim_removes_the_least_recently_inserted_first():
    t = ApproxRadixTree(max_size=30, trim_to=20)
    t.insert("a" * 10)          # oldest
    t.insert("b" * 10)
    t.insert("a" * 10)          # refreshed: now b is the oldest
    t.insert("c" * 10)
    assert t.size == 30
    t.insert("d" * 10)          # 40 > 30: trim to 20 drops b, then the next oldest, a
    assert t.size == 20
    assert t.match_prefix("b" * 10) == 0
    assert t.match_prefix("a" * 10) == 0
    assert t.match_prefix("c" * 10) == 10 and t.match_prefix("d" * 10) == 10


def test_trim_drops_a_branch_tail_before_its_shared_prefix():
    t = ApproxRadixTree(max_size=100, trim_to=100)
    t.insert("shared-prefix/old-tail")
    t.insert("shared-prefix/new-tail")
    t.trim(t.size - len("old-tail"))
    assert t.match_prefix("shared-prefix/new-tail") == len("shared-prefix/new-tail")
    assert t.match_prefix("shared-prefix/old-tail") == len("shared-prefix/")


# ---- policies ----------------------------------------------------------------------------------
def test_round_robin_cycles_over_alive_workers():
    lb = make_load_balancer("round_robin", 3)
    assert [lb.pick([], [0, 0, 0], [True] * 3) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [lb.pick([], [0, 0, 0], [True, False, True]) for _ in range(4)] == [0, 2, 0, 2]


def test_shortest_queue_picks_the_least_loaded_alive_worker():
    lb = make_load_balancer("shortest_queue", 3)
    assert lb.pick([], [5, 1, 3], [True] * 3) == 1
    assert lb.pick([], [5, 1, 3], [True, False, True]) == 2
    # ties are spread, not always the first worker
    assert {lb.pick([], [0, 0, 0], [True] * 3) for _ in range(3)} == {0, 1, 2}


def test_no_alive_worker_is_an_error():
    for method in ("round_robin", "shortest_queue", "cache_aware"):
        with pytest.raises(NoWorkerAvailable):
            make_load_balancer(method, 2).pick([1], [0, 0], [False, False])


def _route(lb, key, loads, alive=None):
    i = lb.pick(key, loads, alive or [True] * len(loads))
    lb.on_routed(i, key)
    return i


def test_cache_aware_sends_a_shared_prefix_to_the_same_worker():
    lb = make_load_balancer("cache_aware", 2, cache_threshold=0.5)
    a = "system prompt of group A, quite long ... " * 3
    b = "another system prompt, of group B ... " * 3
    wa = _route(lb, a + "question 1", [0, 0])
    wb = _route(lb, b + "question 1", [1, 0])     # no match: the smaller (empty) tree
    assert wa != wb
    for q in range(2, 6):
        assert _route(lb, a + f"question {q}", [q, 0]) == wa
        assert _route(lb, b + f"question {q}", [0, q]) == wb


def test_cache_aware_below_the_cache_threshold_goes_to_the_smallest_tree():
    lb = make_load_balancer("cache_aware", 2, cache_threshold=0.9)
    _route(lb, "x" * 100, [0, 0])
    _route(lb, "y" * 10, [0, 0])
    # shares 50% with worker 0's tree: below 0.9, so the worker with the smaller tree (1)
    assert lb.pick("x" * 50 + "z" * 50, [0, 0], [True, True]) == 1
    # a near-complete match stays
    assert lb.pick("x" * 100 + "z", [0, 0], [True, True]) == 0


def test_cache_aware_goes_to_the_least_loaded_when_out_of_balance():
    lb = CacheAware(2, balance_abs_threshold=4, balance_rel_threshold=2.0)
    key = [7] * 50
    w = _route(lb, key, [0, 0])
    other = 1 - w
    loads = [0, 0]
    loads[w], loads[other] = 5, 0          # diff 5 > 4 and 5 > 2 * 0: imbalanced
    assert lb.pick(key, loads, [True, True]) == other
    loads[w], loads[other] = 4, 0          # diff 4, not > 4: balanced, the match wins
    assert lb.pick(key, loads, [True, True]) == w
    loads[w], loads[other] = 12, 6         # diff 6 > 4 but 12 is not > 2 * 6: balanced
    assert lb.pick(key, loads, [True, True]) == w
    loads[w], loads[other] = 13, 6         # both exceeded
    assert lb.pick(key, loads, [True, True]) == other


def test_cache_aware_skips_dead_workers_and_forgets_removed_ones():
    lb = make_load_balancer("cache_aware", 3)
    key = list(range(40))
    w = _route(lb, key, [0, 0, 0])
    alive = [True] * 3
    alive[w] = False
    other = lb.pick(key, [0, 0, 0], alive)
    assert other != w
    lb.remove_worker(w)
    assert lb.trees[w].size == 0
    lb.on_routed(other, key)
    assert lb.pick(key, [0, 0, 0], [True] * 3) == other


def test_cache_aware_trees_respect_the_size_bound():
    lb = make_load_balancer("cache_aware", 2, max_tree_size=64)
    rng = random.Random(2)
    for _ in range(200):
        _route(lb, [rng.randint(0, 99) for _ in range(30)], [0, 0])
    assert all(0 < t.size <= 64 for t in lb.trees)


def test_unknown_method_names_the_flag():
    with pytest.raises(ValueError, match="--load-balance-method"):
        make_load_balancer("random", 2)
