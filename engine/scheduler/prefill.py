"""PrefillAdder: admits waiting requests into one extend batch within the token budget,
the chunk size, the running-request limit and the KV memory left after reserving room for
the running requests to keep decoding."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from engine.scheduler.req import Req

if TYPE_CHECKING:
    from engine.scheduler.scheduler import Scheduler

# A waiting request that shares at least this many more tokens with one already in the
# batch than with the cache waits one step: then it matches that request's fresh KV.
_IN_BATCH_SHARE_MIN = 32
# Decode room reserved per running request: remaining tokens x ratio, capped.
_RESERVE_CAP = 4096


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefillAdder:
    def __init__(self, sched: "Scheduler") -> None:
        self.s = sched
        args = sched.args
        self.token_budget = args.max_prefill_tokens
        self.chunk_left = args.chunked_prefill_size if args.chunked_prefill_size > 0 else None
        if self.chunk_left is not None and sched.mix_chunk:
            # the running requests' decode tokens ride in the same pass: the chunk makes room (at
            # least one prompt token still goes in, so a chunked prompt always advances)
            self.chunk_left = max(self.chunk_left - len(sched.running), 1)
        self.reqs: list[Req] = []
        self.locs: list[torch.Tensor] = []
        self.chunked: Optional[Req] = None
        self.new_tokens = 0
        self.reserved = sum(self.reserve(r) for r in sched.running)
        self.full = False

    def reserve(self, r: Req) -> int:
        p = r.params
        left = (p.max_new_tokens if p.max_new_tokens is not None else _RESERVE_CAP) - len(r.output_ids)
        return int(min(max(left, 0), _RESERVE_CAP) * self.s.new_token_ratio)

    @property
    def out_cache_loc(self) -> torch.Tensor:
        """Host slots of every new token, in batch order."""
        return torch.cat(self.locs) if self.locs else torch.empty(0, dtype=torch.int64)

    def add_chunked(self, req: Req) -> None:
        """Continue the request whose prompt was cut at the last step's chunk boundary."""
        take = req.seq_len - req.kv_len
        if self.chunk_left is not None:
            take = min(take, self.chunk_left)
        if not self._alloc(req, take):
            # No room even for the chunk: give its KV back and let it wait at the front.
            self.s._release(req)
            req.num_retractions += 1
            self.s.waiting.insert(0, req)
            self.full = True
            return
        self._accept(req, take)

    def try_add(self, req: Req) -> bool:
        """Admit req (maybe as a chunk). False: stop looking at further requests."""
        s = self.s
        if self.full or len(s.running) + len(self.reqs) >= s.runner.max_running_requests:
            self.full = True
            return False
        if s.req_to_token_pool.available_size() == 0:
            return False
        if self.chunk_left is not None and self.chunk_left <= 0:
            return False
        ids = req.fill_ids
        prefix, node = s.tree_cache.match_prefix(ids[: req.max_prefix_len])
        if self._shares_with_batch(ids[: req.max_prefix_len + 1], prefix.numel()):
            return True  # wait one step for the sibling's KV
        extend = len(ids) - prefix.numel()
        take = extend if self.chunk_left is None else min(extend, self.chunk_left)
        if self.reqs and self.new_tokens + take > self.token_budget:
            return False
        s.tree_cache.inc_lock_ref(node)
        room = s.available_tokens() - self.reserved
        if room < take + self.page_slack() + (self.reserve(req) if take == extend else 0):
            s.tree_cache.dec_lock_ref(node)
            return False
        req.req_pool_idx = s.req_to_token_pool.alloc()
        # the prefix is page-aligned, so the next slot starts a fresh page: no last_loc needed
        req.prefix_indices, req.last_node, req.kv_len, req.last_loc = prefix, node, prefix.numel(), -1
        if prefix.numel():
            s.req_to_token_pool.write(req.req_pool_idx, 0, prefix)
        if not self._alloc(req, take):
            s._release(req)
            return False
        self._accept(req, take)
        return take == extend

    def page_slack(self) -> int:
        return self.s.page_size - 1

    def _shares_with_batch(self, ids: list[int], cached: int) -> bool:
        if self.s.tree_cache.root is None:
            return False
        for other in self.reqs:
            if other.fill_ids[:1] == ids[:1]:
                if _common_prefix_len(other.fill_ids, ids) - cached >= max(_IN_BATCH_SHARE_MIN,
                                                                           self.s.page_size):
                    return True
        return False

    def _alloc(self, req: Req, take: int) -> bool:
        s = self.s
        s._ensure_free(take + self.page_slack())
        locs = s.allocator.alloc([req.kv_len], [req.kv_len + take], [req.last_loc])
        if locs is None:
            return False
        s.req_to_token_pool.write(req.req_pool_idx, req.kv_len, locs)
        if take:
            req.last_loc = int(locs[-1])
        self.locs.append(locs)
        return True

    def _accept(self, req: Req, take: int) -> None:
        req.extend_len = take
        self.reqs.append(req)
        self.new_tokens += take
        if self.chunk_left is not None:
            self.chunk_left -= take
        if req.kv_len + take < req.seq_len:
            self.chunked = req
            self.full = True
        else:
            self.reserved += self.reserve(req)
