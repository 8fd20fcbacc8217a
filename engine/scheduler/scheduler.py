"""The Scheduler: receive -> pick the next batch -> run it -> process the results.

Prefill (extend) has priority: new requests are admitted by policy within a token budget,
long prompts are chunked; otherwise every running request decodes one token. With mixed chunks
(--enable-mixed-chunk) the running requests decode inside each prefill batch as well. When the KV
pool cannot hold the next decode step, unlocked cache is evicted, then the newest running
requests are retracted to the waiting queue (their computed KV goes to the radix cache).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from typing import Any, Optional

import torch

from engine.constrained.base import backend_class, grammar_key
from engine.constrained.grammar_manager import GrammarManager
from engine.io_struct import (AbortReq, BatchTokenOutput, FlushCacheOutput, FlushCacheReq, GetStatsReq,
                              SchedulerInfo, SchedulerStats, TokenizedGenerateReq)
from engine.mem_cache.radix_cache import ChunkCache, RadixCache
from engine.runner.host_to_device import to_device
from engine.runner.model_runner import ModelRunner
from engine.sampling.stop import find_stop_in_tail, stop_tail_tokens
from engine.scheduler.batch import (build_decode_batch, build_extend_batch, build_sampling_info,
                                    take_prompt_logprob_spans)
from engine.scheduler.flight import InFlight, PromptPart
from engine.scheduler.policy import SchedulePolicy
from engine.scheduler.prefill import PrefillAdder
from engine.scheduler.req import Req, take_new_outputs
from engine.scheduler.step_log import DECODE, PREFILL, StepClock, log_prefill
from engine.server_args import ServerArgs
from engine.speculative.decoder import NgramDecoder
from engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


_INIT_NEW_TOKEN_RATIO = 0.7
_MIN_NEW_TOKEN_RATIO = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
# With nothing to run but grammars compiling, wait this long for one before the next step.
_GRAMMAR_WAIT_S = 0.005


class Scheduler:
    def __init__(self, server_args: ServerArgs, runner: Optional[ModelRunner] = None) -> None:
        self.args = server_args
        self.runner = runner or ModelRunner(server_args)
        r = self.runner
        self.device = r.device
        self.page_size = server_args.page_size
        self.allocator = r.allocator
        self.req_to_token_pool = r.req_to_token_pool
        cache_cls = ChunkCache if server_args.disable_radix_cache else RadixCache
        # slots in the tree live on the host: matching and releasing never wait for the device
        self.tree_cache = cache_cls(self.allocator, self.page_size, torch.device("cpu"))
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache, server_args.random_seed)
        self.tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path,
                                        trust_remote_code=server_args.trust_remote_code)
        self.eos_token_ids = frozenset(r.model_config.eos_token_ids)
        self.seed_rng = random.Random(server_args.random_seed)
        self.grammar: Optional[GrammarManager] = None
        if server_args.grammar_backend != "none":
            backend = backend_class(server_args.grammar_backend)(
                self.tokenizer, r.vocab_size, sorted(self.eos_token_ids))
            self.grammar = GrammarManager(backend, r.max_running_requests)
        # Fraction of a running request's remaining max_new_tokens kept free for it when
        # admitting new prompts; decays while decoding goes well, jumps after a retraction.
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO

        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Optional[Req] = None
        self.reqs_by_rid: dict[str, Req] = {}
        self.outputs: list[Req] = []        # requests with something to send after this step
        # The overlap scheduler launches step N+1 before reading step N's tokens back.
        # ANYSERVE_OVERLAP=1 turns it on where the device is synchronous too (the CPU), which
        # gains nothing there but runs the same bookkeeping: tests use it.
        # Speculative decoding verifies drafts against tokens read back: no overlap scheduler.
        self.spec = NgramDecoder(self) if server_args.speculative_algorithm == "NGRAM" else None
        self.overlap = not server_args.disable_overlap_schedule and self.spec is None and (
            r.platform.async_execution or os.environ.get("ANYSERVE_OVERLAP") == "1")
        self.in_flight: Optional[InFlight] = None
        # --enable-mixed-chunk: the running requests decode inside each prefill batch
        self.mix_chunk = server_args.enable_mixed_chunk and self.spec is None

        # statistics
        self.num_retractions = 0
        self.num_overlapped_steps = 0     # steps launched before the previous one was read
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.forward_ct = 0
        self.last_step_time = time.monotonic()
        self.clock = StepClock(server_args.decode_log_interval)
        logger.info("scheduler ready: %s schedule_policy=%s mixed_chunk=%s overlap_schedule=%s speculative=%s",
                    r.describe(), server_args.schedule_policy, "on" if self.mix_chunk else "off",
                    "on" if self.overlap else (
                        "off (--disable-overlap-schedule)" if server_args.disable_overlap_schedule
                        else "off (speculative decoding)" if self.spec is not None
                        else f"off ({r.platform.name} runs synchronously)"),
                    self.spec.describe() if self.spec is not None else "off")

    @property
    def info(self) -> SchedulerInfo:
        r = self.runner
        return SchedulerInfo(max_total_tokens=r.max_total_tokens, max_running_requests=r.max_running_requests,
                             context_length=r.context_len, vocab_size=r.vocab_size,
                             device=r.platform.name, dtype=str(r.dtype).replace("torch.", ""),
                             attention_backend=r.attention_backend_name,
                             sampling_backend=r.sampling_backend_name,
                             kv_cache_dtype=str(r.kv_cache_dtype).replace("torch.", ""))

    # -- messages ------------------------------------------------------------------------------
    def handle(self, msg: Any) -> Any:
        """Apply one message from the front end; returns an immediate reply or None."""
        if isinstance(msg, TokenizedGenerateReq):
            self._add_request(msg)
        elif isinstance(msg, AbortReq):
            self._abort(msg)
        elif isinstance(msg, FlushCacheReq):
            return self.flush_cache()
        elif isinstance(msg, GetStatsReq):
            return self.stats()
        else:
            raise TypeError(f"scheduler: unknown message {type(msg).__name__}")
        return None

    def _add_request(self, msg: TokenizedGenerateReq) -> None:
        p = msg.sampling_params
        seed = p.seed if p.seed is not None else self.seed_rng.getrandbits(63)
        req = Req(msg.rid, list(msg.input_ids), p, seed, return_logprob=msg.return_logprob,
                  top_logprobs_num=msg.top_logprobs_num,
                  logprob_start_len=msg.logprob_start_len if msg.return_logprob else -1, stream=msg.stream,
                  eos_token_ids=self.eos_token_ids, arrival_time=msg.arrival_time)
        try:
            req.stop_tail = stop_tail_tokens(self.tokenizer, p.stop) if p.stop else 0
            error = self._check_request(req)
        except Exception as e:   # one request the front end should have refused must not stop the loop
            logger.exception("request %s could not be admitted", req.rid)
            error = f"the request could not be admitted: {type(e).__name__}: {e}"
        if error:
            req.finished_reason = {"type": "abort", "message": error}
            self.outputs.append(req)
            return
        if req.prompt_only and not req.wants_prompt_logprobs:
            req.finished_reason = {"type": "length", "length": 0}
            self.outputs.append(req)
            return
        key = grammar_key(p)
        if key is not None:
            if self.grammar is None:
                req.finished_reason = {"type": "abort", "status_code": 400, "message":
                                       f"{key.kind} needs constrained decoding, which is off "
                                       "(--grammar-backend none)"}
                self.outputs.append(req)
                return
            self.grammar.submit(req, key)   # the request waits in the queue until compiled
        self.reqs_by_rid[req.rid] = req
        self.waiting.append(req)

    def _check_request(self, req: Req) -> Optional[str]:
        # The front end validates; this guards the scheduler against a bad direct caller.
        ids = req.origin_input_ids
        if not ids:
            return "the prompt is empty"
        if len(ids) >= self.runner.context_len:
            return f"the prompt has {len(ids)} tokens, the context is {self.runner.context_len}"
        if max(ids) >= self.runner.vocab_size or min(ids) < 0:
            return f"token id outside the vocabulary (size {self.runner.vocab_size})"
        if req.rid in self.reqs_by_rid:
            return f"duplicate request id {req.rid!r}"
        if req.logprob_start_len >= len(ids):
            return (f"logprob_start_len ({req.logprob_start_len}) must be less than the number of "
                    f"prompt tokens ({len(ids)})")
        return None

    def _abort(self, msg: AbortReq) -> None:
        rids = list(self.reqs_by_rid) if msg.abort_all or msg.rid is None else [msg.rid]
        for rid in rids:
            req = self.reqs_by_rid.get(rid)
            if req is None or req.finished:
                continue
            req.finished_reason = {"type": "abort", "message": "aborted by the client"}
            if req in self.waiting:
                self.waiting.remove(req)
                self._release(req)
            elif req is self.chunked_req:
                self.chunked_req = None
                self._release(req)
            elif req in self.running:
                self.running.remove(req)
                self._release(req)
            self.outputs.append(req)
            self.reqs_by_rid.pop(rid, None)

    # -- memory ----------------------------------------------------------------------------
    def _release(self, req: Req) -> None:
        """Give the request's KV to the cache (unlocked) and its row back."""
        if req.req_pool_idx is None:
            return
        slots = self.req_to_token_pool.read(req.req_pool_idx, 0, req.kv_len)
        self.tree_cache.cache_req(req.fill_ids[: req.kv_len], slots, len(req.prefix_indices),
                                  req.last_node, keep_locked=False)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.reset_kv()

    def _share_prefix(self, req: Req) -> None:
        """After an extend: put the computed prefix in the tree so others can match it now."""
        slots = self.req_to_token_pool.read(req.req_pool_idx, 0, req.kv_len)
        res = self.tree_cache.cache_req(req.fill_ids[: req.kv_len], slots, len(req.prefix_indices),
                                        req.last_node, keep_locked=True)
        if res is None:
            return
        new_slots, new_node = res
        old = len(req.prefix_indices)
        if new_slots.numel() > old:
            self.req_to_token_pool.write(req.req_pool_idx, old, new_slots[old:])
        req.prefix_indices, req.last_node = new_slots, new_node

    def available_tokens(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size()

    def _ensure_free(self, tokens: int) -> bool:
        short = tokens - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
        return self.allocator.available_size() >= tokens

    # -- scheduling ----------------------------------------------------------------------------
    def step(self) -> bool:
        """Launch one batch if there is work, and read back the tokens of the one before it (the
        overlap scheduler) or of this one (the plain loop). Returns whether anything ran."""
        self.clock.starting_step()
        ran, launched = self._launch()
        self.clock.step_ran(ran)
        prev, self.in_flight = self.in_flight, launched
        if prev is not None:      # overlap: the previous step's tokens, read while this one runs
            self.num_overlapped_steps += ran
            self._process(prev)
        if not self.overlap:
            self._drain()
        if not ran and prev is None:
            if self.grammar is not None and self.waiting:
                self.grammar.wait(self.waiting, _GRAMMAR_WAIT_S)
            return False
        return True

    def _drain(self) -> None:
        """Read back the batch in flight, if any (waits for the device)."""
        if self.in_flight is not None:
            flight, self.in_flight = self.in_flight, None
            self._process(flight)

    def _launch(self) -> tuple[bool, Optional["InFlight"]]:
        batch, locs = self._schedule_extend()
        if batch:
            decoding, decode_locs = self._alloc_decode() if self.mix_chunk and self.running else ([], None)
            if decoding:
                locs = torch.cat([locs, decode_locs])
            return True, self._launch_extend(batch, locs, decoding)
        if self.running:
            return self.spec.launch() if self.spec is not None else self._launch_decode()
        return False, None

    def _poll_grammars(self) -> list[Req]:
        """Attach finished compiles; finish the requests whose compile failed. Returns the
        waiting requests that may be admitted now."""
        if self.grammar is None:
            return self.waiting
        failed = self.grammar.poll(self.waiting)
        if failed:
            gone = set(map(id, failed))
            self.waiting = [r for r in self.waiting if id(r) not in gone]
            for r in failed:
                self.reqs_by_rid.pop(r.rid, None)
                self.outputs.append(r)
        return [r for r in self.waiting if not GrammarManager.is_waiting(r)]

    def _schedule_extend(self) -> tuple[list[Req], Optional[torch.Tensor]]:
        if not self.waiting and self.chunked_req is None:
            return [], None
        adder = PrefillAdder(self)
        if self.chunked_req is not None:
            adder.add_chunked(self.chunked_req)
            self.chunked_req = None
        ready = self._poll_grammars()
        if ready and not adder.full:
            for req in self.policy.sort(ready):
                if not adder.try_add(req):
                    break
            admitted = set(map(id, adder.reqs))
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
        self.chunked_req = adder.chunked
        return adder.reqs, adder.out_cache_loc

    def _launch_extend(self, reqs: list[Req], locs: torch.Tensor, decoding: list[Req]) -> Optional["InFlight"]:
        """Prefill ``reqs``; ``decoding``: running requests that decode one token each in the same
        pass (mixed chunk), their slots after the prompts' in ``locs``."""
        spans = take_prompt_logprob_spans(reqs)
        fb = build_extend_batch(reqs, locs, self.device, spans, decoding)
        new_tokens = sum(r.extend_len for r in reqs)
        log_prefill(len(reqs), new_tokens, sum(len(r.prefix_indices) for r in reqs), self._token_usage(),
                    len(self.running), len(self.waiting))
        for r in decoding:
            r.kv_len += 1
        for r in reqs:
            r.kv_len += r.extend_len
            if not r.counted_cache:
                r.counted_cache = True
                r.cached_tokens = len(r.prefix_indices)
                self.prompt_tokens_total += len(r.origin_input_ids)
                self.cached_tokens_total += r.cached_tokens
        # whole prompt in KV: sample the first token (max_new_tokens=0: none); the decoding rows last
        done = [i for i, r in enumerate(reqs) if r.kv_len == r.seq_len and not r.prompt_only]
        done += range(len(reqs), len(reqs) + len(decoding))
        batch_reqs = reqs + decoding
        if done:
            fb.future_slots = (self.runner.reserve_future(len(done)), len(done))
        pieces_before = self.runner.piecewise_replays
        logits = self.runner.forward(fb)
        in_pieces = self.runner.piecewise_replays > pieces_before
        prompt = None
        if spans is not None:
            prompt = PromptPart([(r, hi - lo) for r, (lo, hi) in zip(reqs, spans) if hi > lo],
                                 [r for r in reqs if r.prompt_only and r.kv_len == r.seq_len],
                                 fb.prompt_logprobs)
        flight = None
        if done:
            rows_idx = None if len(done) == len(batch_reqs) else to_device(done, logits.device)
            rows = logits if rows_idx is None else logits[rows_idx]
            input_ids = None
            if decoding:   # the decoding rows' inputs (their in-flight tokens resolved), for penalties
                last = fb.logits_indices if rows_idx is None else fb.logits_indices[rows_idx]
                input_ids = fb.input_ids[last]
                self._drain_for_grammar(decoding)
            flight = self._launch_sample([batch_reqs[i] for i in done], rows, fb.future_slots[0], PREFILL,
                                         new_tokens, input_ids, prompt=prompt)
            flight.mixed_decodes = len(decoding)
            if decoding:
                self.decay_new_token_ratio()
        elif prompt is not None:
            copy = self.runner.platform.copy_to_host_async([None] * 4 + prompt.tensors)
            flight = InFlight([], copy, PREFILL, new_tokens, prompt)
        if flight is not None:
            flight.in_pieces = in_pieces
        for r in reqs:
            self._share_prefix(r)
            if r.kv_len == r.seq_len - 1 and r.num_out:  # prefill complete, next: decode
                self.running.append(r)
        self.forward_ct += 1
        return flight

    def _finishes_by_length(self, r: Req) -> bool:
        """A token still on the device will be this request's last (known without reading it)."""
        p = r.params
        return r.pending > 0 and ((p.max_new_tokens is not None and r.num_out >= p.max_new_tokens)
                                  or r.seq_len >= self.runner.context_len)

    def _alloc_decode(self) -> tuple[list[Req], Optional[torch.Tensor]]:
        """Make room for the next decode step; give each running request that decodes in it a
        slot for its newest token. Returns those requests and their slots (on the host)."""
        self._make_room_for_decode()
        reqs = [r for r in self.running if not self._finishes_by_length(r)]
        if not reqs:
            return [], None
        host_locs = self.allocator.alloc([r.kv_len for r in reqs], [r.kv_len + 1 for r in reqs],
                                         [r.last_loc for r in reqs])
        assert host_locs is not None, "decode allocation failed after making room"
        for r, loc in zip(reqs, host_locs.tolist()):
            r.last_loc = loc
        self.req_to_token_pool.write_cells([r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], host_locs)
        return reqs, host_locs

    def _drain_for_grammar(self, decoding: list[Req]) -> None:
        """A grammar's mask needs the token in flight: read it back while this step's forward runs,
        then sample. (Penalties count it on the device: PenaltyBatch.)"""
        if self.in_flight is not None and any(r.grammar is not None for r in decoding):
            self._drain()
            self.num_overlapped_steps += 1

    def _launch_decode(self) -> tuple[bool, Optional["InFlight"]]:
        reqs, host_locs = self._alloc_decode()
        if not reqs:
            return False, None
        fb = build_decode_batch(reqs, host_locs, self.device)
        fb.future_slots = (self.runner.reserve_future(len(reqs)), len(reqs))
        logits = self.runner.forward(fb)
        for r in reqs:
            r.kv_len += 1
        self._drain_for_grammar(reqs)
        flight = self._launch_sample(reqs, logits, fb.future_slots[0], DECODE, len(reqs), fb.input_ids)
        self.forward_ct += 1
        self.log_decode_due()
        self.decay_new_token_ratio()
        return True, flight

    def log_decode_due(self) -> None:
        """Count a decode step; write the 'Decode batch' line when one is due."""
        if self.clock.decode_launched():
            cap = self.runner.max_total_tokens
            used = cap - self.available_tokens()
            self.clock.log_decode(len(self.running), used, used / cap, len(self.waiting),
                                  self.spec.take_window_accept_length() if self.spec is not None else None)

    def decay_new_token_ratio(self) -> None:
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)

    def _make_room_for_decode(self) -> None:
        def pages_needed() -> int:
            return sum(1 for r in self.running
                       if r.kv_len % self.page_size == 0 and not self._finishes_by_length(r)) * self.page_size

        while self.running and not self._ensure_free(pages_needed()):
            if self.in_flight is not None:  # finished requests in flight may free enough
                self._drain()
                continue
            if len(self.running) == 1:  # one request larger than the whole pool
                victim = self.running.pop()
                victim.finished_reason = {"type": "length", "length": len(victim.output_ids),
                                          "message": "the KV cache is full"}
                self._release(victim)
                self.reqs_by_rid.pop(victim.rid, None)
                self.outputs.append(victim)
                logger.warning("request %s stopped: it alone fills the KV cache (%d tokens)",
                               victim.rid, self.runner.max_total_tokens)
                return
            victim = max(self.running, key=lambda r: (r.arrival_time, len(r.output_ids)))
            self.running.remove(victim)
            self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
            self._release(victim)
            victim.num_retractions += 1
            self.num_retractions += 1
            self.waiting.append(victim)
            logger.debug("retracted %s (pool short)", victim.rid)

    # -- results -----------------------------------------------------------------------------
    def _launch_sample(self, reqs: list[Req], logits: torch.Tensor, future_base: int, kind: str,
                       tokens: int, input_ids: Optional[torch.Tensor] = None,
                       prompt: Optional[PromptPart] = None) -> "InFlight":
        """Queue the sampling of ``reqs``'s next tokens and their copy to the host. ``input_ids``:
        a decode step's inputs on the device (its in-flight tokens resolved)."""
        info = build_sampling_info(reqs, self.runner.vocab_size, self.device)
        info.step_input_ids = input_ids
        if self.grammar is not None:    # CPU work that overlaps the device's forward pass
            info.vocab_mask, info.vocab_mask_rows = self.grammar.vocab_mask(reqs, self.device)
        out = self.runner.sample(logits, info, future_base)
        for i, r in enumerate(reqs):
            r.pending += 1
            r.future_idx = future_base + i
        copy = self.runner.platform.copy_to_host_async(
            [out.next_token_ids, out.logprobs, out.top_logprobs, out.top_logprob_ids]
            + (prompt.tensors if prompt is not None else []))
        return InFlight(reqs, copy, kind, tokens, prompt)

    def _process(self, flight: "InFlight") -> None:
        """Append a step's tokens, finish the requests they end, queue what to send."""
        host = [t.tolist() if t is not None else None for t in flight.copy.wait()]
        next_ids, logprobs, top_vals, top_ids = host[:4]
        self.clock.done(flight.kind, flight.tokens, flight.mixed_decodes, flight.in_pieces)
        if flight.prompt is not None:   # before the first token: the stream sends them together
            self._process_prompt(flight.prompt, *host[4:])
        finished = []
        for i, (r, tok) in enumerate(zip(flight.reqs, next_ids or [])):
            r.pending -= 1
            if r.finished:   # aborted, or ended by its previous token: this one is one too many
                continue
            self.append_token(r, tok, i, logprobs, top_vals, top_ids)
            if r.finished:
                finished.append(r)
            if r.output_due(self.args.stream_interval):
                self.outputs.append(r)
        if finished:
            self.finish_reqs(finished)

    def append_token(self, r: Req, tok: int, row: int, logprobs: Optional[list], top_vals: Optional[list],
                     top_ids: Optional[list]) -> None:
        """Append one sampled token (row ``row`` of the step's host outputs) and set the finish
        reason it causes."""
        r.output_ids.append(tok)
        if r.grammar is not None and not r.grammar.accept_token(tok):
            logger.error("request %s: the grammar rejected sampled token %d", r.rid, tok)
            r.finished_reason = {"type": "abort", "message": f"internal error: the grammar "
                                 f"rejected the sampled token {tok}"}
        if r.return_logprob and logprobs is not None:
            r.output_logprobs.append(logprobs[row])
            k = r.top_logprobs_num
            r.output_top_logprobs.append(
                list(zip(top_vals[row][:k], top_ids[row][:k])) if k and top_vals is not None else [])
        if not r.finished:
            self._check_finished(r, tok)

    def finish_reqs(self, finished: list[Req]) -> None:
        """Take finished requests out of the running batch and give their KV to the cache."""
        done = set(map(id, finished))
        self.running = [r for r in self.running if id(r) not in done]
        for r in finished:
            self._release(r)
            self.reqs_by_rid.pop(r.rid, None)

    def _process_prompt(self, part: PromptPart, values: Optional[list], top_vals: Optional[list],
                        top_ids: Optional[list]) -> None:
        """Append each request's prompt logprobs; finish the max_new_tokens=0 requests."""
        row = 0
        for r, n in part.counts:
            r.input_logprobs.extend(values[row: row + n])
            k = r.top_logprobs_num
            for j in range(row, row + n):
                r.input_top_logprobs.append(list(zip(top_vals[j][:k], top_ids[j][:k])) if k else [])
            row += n
        for r in part.finishing:    # in no queue since its launch; an abort only marked it
            if not r.finished:
                r.finished_reason = {"type": "length", "length": 0}
                self.outputs.append(r)
        if part.finishing:
            self.finish_reqs(part.finishing)

    def _check_finished(self, r: Req, tok: int) -> None:
        p = r.params
        n_out = len(r.output_ids)
        if tok in r.stop_token_ids and n_out >= p.min_new_tokens:
            r.finished_reason = {"type": "stop", "matched": tok}
            return
        if p.stop and n_out >= p.min_new_tokens:
            matched = find_stop_in_tail(self.tokenizer, r.output_ids, p.stop, r.stop_tail)
            if matched is not None:
                r.finished_reason = {"type": "stop", "matched": matched}
                return
        if r.grammar is not None and r.grammar.is_terminated():     # the document is complete
            r.finished_reason = {"type": "stop", "matched": tok}
            return
        if (p.max_new_tokens is not None and n_out >= p.max_new_tokens) or \
                len(r.origin_input_ids) + n_out >= self.runner.context_len:
            r.finished_reason = {"type": "length", "length": n_out}

    def take_outputs(self) -> Optional[BatchTokenOutput]:
        """New tokens of every request that has something to send since the last call."""
        if not self.outputs:
            return None
        seen, reqs = set(), []
        for r in self.outputs:
            if id(r) not in seen:
                seen.add(id(r))
                reqs.append(r)
        self.outputs = []
        return take_new_outputs(reqs)

    # -- maintenance -------------------------------------------------------------------------
    def is_idle(self) -> bool:
        return (not self.waiting and not self.running and self.chunked_req is None
                and self.in_flight is None)

    def flush_cache(self) -> FlushCacheOutput:
        self._drain()   # a step still in flight after the last request finished holds nothing
        if not self.is_idle():
            return FlushCacheOutput(False, "cannot flush the cache while requests are running")
        self.tree_cache.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()
        return FlushCacheOutput(True)

    def _token_usage(self) -> float:
        """Fraction of the KV slots held by requests (not free, not evictable cache)."""
        cap = self.runner.max_total_tokens
        return (cap - self.available_tokens()) / cap

    def stats(self) -> SchedulerStats:
        cap = self.runner.max_total_tokens
        free = self.allocator.available_size()
        evictable = self.tree_cache.evictable_size()
        return SchedulerStats(
            num_running_reqs=len(self.running) + (self.chunked_req is not None),
            num_queue_reqs=len(self.waiting), token_usage=self._token_usage(),
            gen_throughput=self.clock.gen_throughput if self.running else 0.0,
            step_totals=dataclasses.replace(self.clock.totals),
            cache_hit_rate=self.cached_tokens_total / max(1, self.prompt_tokens_total),
            max_total_tokens=cap, available_tokens=free + evictable, evictable_tokens=evictable,
            num_retractions=self.num_retractions, num_evicted_tokens=self.tree_cache.num_evicted_tokens,
            prompt_tokens_total=self.prompt_tokens_total, cached_tokens_total=self.cached_tokens_total,
            spec=dataclasses.replace(self.spec.totals) if self.spec is not None else None)

    def check_memory_whole(self) -> None:
        """When idle, every slot is free or held by the cache (nothing leaked)."""
        cap = self.runner.max_total_tokens
        free, cached = self.allocator.available_size(), self.tree_cache.total_size()
        assert self.tree_cache.protected_size() == 0, f"{self.tree_cache.protected_size()} slots still locked"
        assert free + cached == cap, f"KV leak: free {free} + cached {cached} != capacity {cap}"
