"""NgramDecoder: the decode step of the running batch when speculative decoding is on.

Each request gets up to K n-gram drafts (ngram.py). One forward pass of the target model runs
every request's [newest token, *drafts] as an extend over its cached KV, with logits at every
position; position j is sampled with the request's own parameters and its randomness for output
position num_out + j (the sampler's (seed, step) stream), so it draws exactly what plain decoding
would draw there. Drafts are accepted while they equal the sampled tokens; the first sampled token
that differs (or the one after the last draft) is emitted too. Outputs are therefore the same as
with speculative decoding off, greedy or sampled. Stop tokens, stop strings, max_new_tokens and the
context length end a request at the same token as plain decoding: tokens are appended one by one.

Requests that get no drafts (they decode one token in the same step): those with a grammar (its
mask needs every earlier token accepted) and those with frequency/presence/repetition penalties
(the penalties count every earlier token). When no request has a draft, or the KV pool cannot
hold the drafts, the step is a plain decode step (device graphs, retraction when short).

KV: slots are allocated for all k+1 positions; after acceptance the request keeps those of the
tokens it took (the newest one's KV is written by the next step, as in decode), and the pages
past its last kept position go back to the allocator.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from engine.io_struct import SpecCounts
from engine.scheduler.batch import build_sampling_info, build_verify_batch
from engine.scheduler.req import Req
from engine.scheduler.step_log import DECODE
from engine.speculative.ngram import TokenHistory, propose_ngram

if TYPE_CHECKING:
    from engine.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


def wants_drafts(r: Req) -> bool:
    """Whether a request may get drafts (see the module docstring for those that do not)."""
    p = r.params
    return (r.grammar is None and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and p.repetition_penalty == 1.0)


class NgramDecoder:
    def __init__(self, sched: "Scheduler") -> None:
        args = sched.args
        self.s = sched
        self.num_draft_tokens = args.speculative_num_draft_tokens
        self.min_n = args.speculative_ngram_min_match_window_size
        self.max_n = args.speculative_ngram_max_match_window_size
        self.totals = SpecCounts()
        self.window = SpecCounts()       # since the last decode log line

    def describe(self) -> str:
        return (f"NGRAM ({self.num_draft_tokens} draft tokens, match window {self.min_n}..{self.max_n}; "
                f"verify steps run eagerly, plain decode steps as before)")

    def draft(self, r: Req) -> list[int]:
        """Up to num_draft_tokens drafts for r, never past its max_new_tokens or the context."""
        k = min(self.num_draft_tokens, self.s.runner.context_len - r.seq_len)
        if r.params.max_new_tokens is not None:
            k = min(k, r.params.max_new_tokens - r.num_out - 1)
        if k < 1 or not wants_drafts(r):
            return []
        if r.token_history is None:
            r.token_history = TokenHistory()
        tokens = r.token_history.sync(r.origin_input_ids, r.output_ids)
        return propose_ngram(tokens, self.min_n, self.max_n, k).tolist()

    def launch(self) -> tuple[bool, None]:
        """Run one decode step of the running batch (verifying drafts where there are any)."""
        s = self.s
        assert not s.overlap and s.in_flight is None, "speculative decoding runs without the overlap scheduler"
        reqs = list(s.running)
        drafts = [self.draft(r) for r in reqs]
        if not any(drafts) or not self._make_room(reqs, drafts):
            ran, flight = s._launch_decode()
            if flight is not None:
                self._count(SpecCounts(req_steps=len(flight.reqs)))
            return ran, flight
        counts = [len(d) + 1 for d in drafts]
        locs = s.allocator.alloc([r.kv_len for r in reqs], [r.kv_len + n for r, n in zip(reqs, counts)],
                                 [r.last_loc for r in reqs])
        assert locs is not None, "verify allocation failed after making room"
        rows = [r for r, n in zip(reqs, counts) for _ in range(n)]       # one row per position
        offsets = [j for n in counts for j in range(n)]
        s.req_to_token_pool.write_cells([r.req_pool_idx for r in rows],
                                        [r.kv_len + j for r, j in zip(rows, offsets)], locs)
        logits = s.runner.forward(build_verify_batch(reqs, drafts, locs, s.device))   # [rows, vocab]
        info = build_sampling_info(rows, s.runner.vocab_size, s.device, offsets)
        if s.grammar is not None:
            info.vocab_mask, info.vocab_mask_rows = s.grammar.vocab_mask(rows, s.device)
        out = s.runner.sample(logits, info)
        host = [t.tolist() if t is not None else None
                for t in (out.next_token_ids, out.logprobs, out.top_logprobs, out.top_logprob_ids)]
        emitted = self._accept(reqs, drafts, locs, *host)
        s.clock.done(DECODE, emitted)
        s.forward_ct += 1
        s.log_decode_due()
        s.decay_new_token_ratio()
        return True, None

    def _make_room(self, reqs: list[Req], drafts: list[list[int]]) -> bool:
        """Whether the pool (after evicting unlocked cache) holds every request's k+1 slots."""
        a = self.s.allocator
        pages = sum(a.pages_needed(r.kv_len, r.kv_len + len(d) + 1) for r, d in zip(reqs, drafts))
        return self.s._ensure_free(pages * a.page_size)

    def _accept(self, reqs: list[Req], drafts: list[list[int]], locs: torch.Tensor, next_ids: list[int],
                logprobs: Optional[list], top_vals: Optional[list], top_ids: Optional[list]) -> int:
        """Append each request's accepted drafts and the token after them, free the slots it does not
        keep, finish what ended. Returns the tokens emitted."""
        s, page = self.s, self.s.page_size
        step = SpecCounts(req_steps=len(reqs), verify_steps=1)
        finished: list[Req] = []
        row = 0
        for r, d in zip(reqs, drafts):
            n = len(d) + 1
            sampled = next_ids[row: row + n]
            accepted = 0
            while accepted < len(d) and d[accepted] == sampled[accepted]:
                accepted += 1
            kv_before, taken = r.kv_len, 0
            for j in range(accepted + 1):
                s.append_token(r, sampled[j], row + j, logprobs, top_vals, top_ids)
                taken += 1
                if r.finished:
                    break
            # KV of [newest token, d_1 .. d_{taken-1}] is kept: all are in the sequence now
            r.kv_len = kv_before + taken
            mine = locs[row: row + n]
            r.last_loc = int(mine[taken - 1])
            keep = -(-r.kv_len // page) * page - kv_before     # up to the end of the last kept page
            if keep < n:
                s.allocator.free(mine[keep:])
            if d:
                step.verifications += 1
                step.draft_tokens += len(d)
                step.accepted_tokens += taken - 1
            if r.finished:
                finished.append(r)
            if r.output_due(s.args.stream_interval):
                s.outputs.append(r)
            row += n
        if finished:
            s.finish_reqs(finished)
        self._count(step)
        return step.req_steps + step.accepted_tokens

    def _count(self, step: SpecCounts) -> None:
        self.totals += step
        self.window += step

    def take_window_accept_length(self) -> float:
        """The accept length since the last call (the decode log line's window)."""
        length, self.window = self.window.accept_length, SpecCounts()
        return length
