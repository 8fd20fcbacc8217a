"""Speculative decoding with n-gram drafts (--speculative-algorithm NGRAM) gives exactly the tokens and
finish reasons of decoding without it, greedy and seeded sampling alike, while accepting drafts where
the text repeats; the n-gram proposer on its own; KV bookkeeping (nothing leaks, the radix cache holds
only KV of tokens in the sequence, retraction, aborts); its counters, log line, metrics and flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.io_struct import SchedulerStats, SpecCounts, TokenizedGenerateReq
from engine.sampling.sampling_params import SamplingParams
from engine.scheduler.req import Req
from engine.scheduler.scheduler import Scheduler
from engine.server_args import ServerArgs
from engine.speculative.decoder import wants_drafts
from engine.speculative.ngram import TokenHistory, propose_ngram
from test_overlap import _req, _run

SPEC = dict(speculative_algorithm="NGRAM")


# ---- the proposer ------------------------------------------------------------------------------
def _propose(tokens, min_n=1, max_n=12, k=4) -> list[int]:
    return propose_ngram(np.array(tokens, dtype=np.int64), min_n, max_n, k).tolist()


def test_ngram_takes_the_longest_suffix_that_occurred_before():
    # "2 3" occurred twice; "1 2 3" only at the start: the longer match wins over the more recent one
    seq = [1, 2, 3, 40, 41, 9, 2, 3, 50, 51, 1, 2, 3]
    assert _propose(seq) == [40, 41, 9, 2]
    assert _propose(seq, max_n=2) == [50, 51, 1, 2]         # longest allowed is "2 3": most recent one


def test_ngram_takes_the_most_recent_occurrence():
    assert _propose([7, 1, 7, 2, 7, 3, 7]) == [3, 7]          # ends where the sequence ends
    assert _propose([5, 6, 1, 5, 6, 2, 5, 6]) == [2, 5, 6]


def test_ngram_min_and_max_match_window():
    seq = [1, 2, 3, 9, 8, 3]                  # only "3" (length 1) occurred before
    assert _propose(seq, min_n=1) == [9, 8, 3]
    assert _propose(seq, min_n=2) == []
    assert _propose([4, 5, 6, 4, 5, 6], min_n=3, max_n=3) == [4, 5, 6]
    assert _propose([4, 5, 6, 4, 5, 6], min_n=4, max_n=6) == []   # "4 5 6" is 3 tokens only
    assert _propose([1, 2, 3, 4]) == []                            # nothing repeats
    assert _propose([3]) == [] and _propose([]) == []


def test_ngram_caps_the_draft_at_k_and_overlaps_the_suffix():
    seq = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert _propose(seq, k=4) == [3, 4, 5, 6]
    assert _propose(seq, k=2) == [3, 4]
    assert _propose(seq, k=0) == []
    # "5 5" last ended at index 2 before the suffix: one token follows it within the sequence
    assert _propose([5, 5, 5, 5], max_n=2) == [5]


def test_token_history_appends_only_what_is_new():
    h = TokenHistory()
    assert h.sync([1, 2], []).tolist() == [1, 2]
    assert h.sync([1, 2], [3]).tolist() == [1, 2, 3]
    long_out = list(range(600))
    assert h.sync([1, 2], [3] + long_out).tolist() == [1, 2, 3] + long_out     # grows past its buffer


# ---- spec on == spec off ------------------------------------------------------------------------
def _sched(model, **kw) -> Scheduler:
    return Scheduler(ServerArgs(model_path=str(model), log_level="warning", device="cpu", **kw))


def _repeated(n: int, period: int = 24, offset: int = 0) -> list[int]:
    """A prompt that repeats a passage: drafts copied from it get accepted."""
    passage = [(5 * j + offset) % 400 + 10 for j in range(period)]
    return (passage * (n // period + 1))[:n]


def _never_repeats(n: int, start: int) -> list[int]:
    return [start + j for j in range(n)]


def _compare(model, make_reqs, spec_kw=None, patch=lambda s: s, **kw):
    """Run the same requests without and with speculative decoding; outputs must be identical."""
    want = _run(patch(_sched(model, **kw)), make_reqs())
    s = patch(_sched(model, **SPEC, **(spec_kw or {}), **kw))
    got = _run(s, make_reqs())          # also checks the KV pool is whole when idle
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid
        assert [[t for _, t in row] for row in got[rid]["top"]] == [[t for _, t in row] for row in want[rid]["top"]]
    return want, got, s


def _mixed_batch() -> list[TokenizedGenerateReq]:
    return [
        _req("greedy-rep", _repeated(72), max_new_tokens=40, temperature=0, ignore_eos=True),
        _req("seeded-rep", _repeated(50, offset=3), max_new_tokens=36, temperature=0.9, top_p=0.9, top_k=50,
             seed=11, ignore_eos=True),
        _req("min-p", _repeated(30, period=6, offset=7), max_new_tokens=30, temperature=1.2, min_p=0.05, seed=5,
             ignore_eos=True, logprobs=3),
        _req("hot", _repeated(40, period=8, offset=1), max_new_tokens=32, temperature=1.5, seed=2, ignore_eos=True),
        _req("no-repeat", _never_repeats(13, 700), max_new_tokens=25, temperature=0, ignore_eos=True, logprobs=2),
        _req("no-repeat-sampled", _never_repeats(9, 900), max_new_tokens=20, temperature=0.8, seed=4,
             ignore_eos=True),
        _req("short", _repeated(5, period=2), max_new_tokens=3, temperature=0, ignore_eos=True),
        _req("no-stream", _repeated(33, period=11), stream=False, max_new_tokens=21, temperature=0,
             ignore_eos=True),
        _req("logit-bias", _repeated(20, period=5), max_new_tokens=18, temperature=0.7, seed=8, ignore_eos=True,
             logit_bias={"15": 2.0, "20": 1.5}),
    ]


@pytest.mark.parametrize("page_size", [1, 4])
def test_spec_equals_plain_decoding_and_accepts_drafts(llama_tiny, page_size):
    _, got, s = _compare(llama_tiny, _mixed_batch, page_size=page_size)
    t = s.spec.totals
    assert t.verify_steps > 0 and t.draft_tokens > 0
    assert t.accepted_tokens > 10, t          # repetitive text: many drafts were right
    assert t.accept_length > 1.2, t
    assert got["no-stream"]["chunks"] == 1
    # fewer forward steps than tokens generated
    generated = sum(len(v["ids"]) for v in got.values())
    assert s.forward_ct < generated


def test_spec_with_chunked_prefill_and_several_draft_sizes(llama_tiny):
    def reqs():
        return [_req(f"long{i}", _repeated(90 + 7 * i, period=13 + i), max_new_tokens=30, temperature=0.6 * i,
                     seed=i, ignore_eos=True) for i in range(4)]

    for k, window in ((1, (1, 3)), (7, (2, 12))):
        _, _, s = _compare(llama_tiny, reqs, spec_kw=dict(speculative_num_draft_tokens=k,
                                                          speculative_ngram_min_match_window_size=window[0],
                                                          speculative_ngram_max_match_window_size=window[1]),
                           chunked_prefill_size=32)
        assert s.spec.totals.accepted_tokens > 0
        assert s.spec.totals.draft_tokens <= k * s.spec.totals.verifications


def _counting_model(s: Scheduler) -> Scheduler:
    """Replace the model's logits (after it ran, so KV is still written) by ones under which greedy
    picks input id + 1: a prompt ending like an earlier passage of it is continued by copying that
    passage, so every draft is accepted, and each output token is new to the output."""
    real = s.runner.model.forward
    vocab = s.runner.vocab_size

    def forward(input_ids, positions, batch):
        logits = real(input_ids, positions, batch)
        ids = input_ids if batch.logits_indices is None else input_ids[batch.logits_indices]
        out = torch.zeros_like(logits)
        out[torch.arange(out.shape[0]), (ids + 1) % vocab] = 10.0
        return out

    s.runner.model.forward = forward
    return s


def _counting_prompt(start: int) -> list[int]:
    return list(range(start, start + 30)) + list(range(start, start + 6))   # continues start + 6, + 7, ...


def test_stop_token_and_max_new_tokens_cut_inside_an_accepted_run(llama_tiny):
    def reqs():
        return ([_req("stop-id", _counting_prompt(100), max_new_tokens=30, temperature=0, stop_token_ids=[108]),
                 _req("stop-sampled", _counting_prompt(200), max_new_tokens=30, temperature=0.7, seed=3,
                      stop_token_ids=[213]),
                 _req("min-new", _counting_prompt(300), max_new_tokens=30, temperature=0, stop_token_ids=[309],
                      min_new_tokens=3)]
                + [_req(f"len{n}", _counting_prompt(400 + 40 * n), max_new_tokens=n, temperature=0, ignore_eos=True)
                   for n in (1, 2, 3, 4, 6, 7, 8, 13)])

    want, got, s = _compare(llama_tiny, reqs, patch=_counting_model)
    # the first verify step accepts drafts 106..109 and emits 106..110: the stop cuts inside that run
    assert want["stop-id"]["ids"] == [106, 107, 108] and want["stop-id"]["finish"] == {"type": "stop", "matched": 108}
    assert want["stop-sampled"]["ids"][-1] == 213 and want["stop-sampled"]["finish"]["type"] == "stop"
    # 309 is banned at output positions 1 and 2 of the same verify step, not at 3
    assert want["min-new"]["ids"] == [306, 307, 308, 309]
    for n in (1, 2, 3, 4, 6, 7, 8, 13):
        start = 400 + 40 * n + 6
        assert got[f"len{n}"]["ids"] == list(range(start, start + n)), n
        assert got[f"len{n}"]["finish"] == {"type": "length", "length": n}
    t = s.spec.totals
    assert t.accepted_tokens > 20 and t.verify_steps <= 4
    assert got["stop-id"]["chunks"] == 2          # the prefill's token, then one step that cut the run


def test_stop_string_cuts_inside_an_accepted_run(llama_tiny):
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(str(llama_tiny))
    prompt = _counting_prompt(500)
    stop = tok.decode([508]).strip()
    assert stop and stop not in tok.decode(list(range(506, 508)))
    want, got, _ = _compare(llama_tiny, lambda: [_req("stop-str", prompt, max_new_tokens=30, temperature=0,
                                                       stop=[stop])], patch=_counting_model)
    assert want["stop-str"]["finish"] == {"type": "stop", "matched": stop}
    assert len(want["stop-str"]["ids"]) <= 4


def test_penalties_and_grammars_decode_without_drafts(llama_tiny):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})

    def reqs():
        return [_req("penalties", _repeated(40, period=8), max_new_tokens=20, temperature=0.8, seed=3,
                     frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.3, ignore_eos=True),
                _req("json", [10, 11, 12], max_new_tokens=24, temperature=0.7, seed=1, json_schema=schema),
                _req("regex", [18, 19], max_new_tokens=30, temperature=1.0, seed=4, regex="(ab)+c"),
                _req("free", _repeated(48, period=12), max_new_tokens=30, temperature=0, ignore_eos=True)]

    _, _, s = _compare(llama_tiny, reqs)
    assert s.spec.totals.accepted_tokens > 0          # the free request still speculated
    assert not wants_drafts(Req("p", [1], SamplingParams(repetition_penalty=1.1), 0))
    assert not wants_drafts(Req("p", [1], SamplingParams(presence_penalty=0.1), 0))
    assert wants_drafts(Req("p", [1], SamplingParams(logit_bias={3: 1.0}, stop=["x"]), 0))


def test_retraction_in_a_small_pool(llama_tiny):
    def reqs():
        return [_req(f"r{i}", _repeated(30 + i, period=5 + i % 3, offset=i), max_new_tokens=80,
                     temperature=0.5 * (i % 2), seed=i, ignore_eos=True) for i in range(12)]

    kw = dict(max_total_tokens=256, max_running_requests=8)
    for page_size in (1, 4):
        _, _, s = _compare(llama_tiny, reqs, page_size=page_size, **kw)
        assert s.num_retractions > 0
        assert s.spec.totals.accepted_tokens > 0


def test_cache_holds_only_kv_of_sequence_tokens(llama_tiny):
    """After speculative runs the radix tree's keys are prefixes of the requests' sequences, and its
    KV is right: a prompt extending a finished sequence, served from the cache, decodes as a fresh
    scheduler does."""
    s = _sched(llama_tiny, **SPEC, page_size=2)
    prompts = {f"r{i}": _repeated(30 + 5 * i, period=7 + i) for i in range(3)}
    out = _run(s, [_req(rid, p, max_new_tokens=30, temperature=0, ignore_eos=True) for rid, p in prompts.items()])
    assert s.spec.totals.accepted_tokens > 0
    sequences = [prompts[rid] + out[rid]["ids"] for rid in prompts]

    def paths(node, prefix):
        if not node.children:
            yield prefix
        for child in node.children.values():
            yield from paths(child, prefix + child.key)

    for path in paths(s.tree_cache.root, []):
        assert any(seq[: len(path)] == path for seq in sequences), path
    follow = [_req("follow", sequences[1] + [5, 6], max_new_tokens=12, temperature=0, ignore_eos=True)]
    cached = _run(s, follow)["follow"]["ids"]
    assert _run(_sched(llama_tiny, page_size=2), follow)["follow"]["ids"] == cached


def test_abort_of_a_speculating_request_frees_everything(llama_tiny):
    s = _sched(llama_tiny, **SPEC)
    reqs = [_req(f"r{i}", _repeated(40 + i, offset=i), max_new_tokens=60, temperature=0, ignore_eos=True)
            for i in range(3)]
    out = _run(s, reqs, abort_at={6: ["r1"], 9: ["r0"]})    # _run checks the memory is whole at the end
    assert out["r1"]["finish"]["type"] == "abort" and out["r0"]["finish"]["type"] == "abort"
    assert len(out["r2"]["ids"]) == 60
    assert s.spec.totals.accepted_tokens > 0


def test_n_greater_than_one_through_the_engine(llama_tiny):
    from engine.entrypoints.engine import Engine

    params = {"temperature": 0.9, "n": 3, "max_new_tokens": 24, "seed": 7, "ignore_eos": True}
    prompt = _repeated(60)
    outs = {}
    for spec in (False, True):
        with Engine(model_path=str(llama_tiny), device="cpu", log_level="warning", **(SPEC if spec else {})) as eng:
            outs[spec] = [o["output_ids"] for o in eng.generate(input_ids=prompt, sampling_params=params)]
    assert len(outs[True]) == 3 and outs[True] == outs[False]


# ---- scheduler choices, counters, log, metrics, flags ----------------------------------------
def test_spec_turns_the_overlap_scheduler_off(llama_tiny, monkeypatch, caplog):
    monkeypatch.setenv("ANYSERVE_OVERLAP", "1")
    with caplog.at_level("INFO"):
        s = Scheduler(ServerArgs(model_path=str(llama_tiny), device="cpu", **SPEC))
    assert not s.overlap
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("scheduler ready"))
    assert "overlap_schedule=off (speculative decoding)" in line
    assert "speculative=NGRAM (4 draft tokens, match window 1..12; verify steps run eagerly" in line


def test_counters_log_line_and_metrics(llama_tiny, caplog):
    from engine.entrypoints.dp_client import merge_stats
    from engine.entrypoints.metrics import ServerMetrics

    s = _sched(llama_tiny, **SPEC, decode_log_interval=4)
    with caplog.at_level("INFO", logger="engine.scheduler"):
        out = _run(s, [_req("r", _repeated(72), max_new_tokens=40, temperature=0, ignore_eos=True)])
    stats = s.stats()
    spec = stats.spec
    assert spec == s.spec.totals and spec.accepted_tokens > 0
    # every token after the prefill's came from a decode step: one per request-step plus the accepted
    assert spec.req_steps + spec.accepted_tokens == len(out["r"]["ids"]) - 1
    assert stats.step_totals.decode_tokens == len(out["r"]["ids"]) - 1
    assert spec.accept_length == pytest.approx((spec.req_steps + spec.accepted_tokens) / spec.req_steps)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Decode batch.")]
    assert lines and all("accept len: " in m for m in lines)
    assert _sched(llama_tiny).stats().spec is None

    merged = merge_stats([stats, stats])
    assert merged.spec.accepted_tokens == 2 * spec.accepted_tokens
    m = ServerMetrics()
    m.update_scheduler_stats(stats)
    m.update_scheduler_stats(stats)             # cumulative: counted once
    text = m.render().decode()
    assert f"anyserve:spec_accepted_tokens_total {float(spec.accepted_tokens)}" in text
    assert f"anyserve:spec_draft_tokens_total {float(spec.draft_tokens)}" in text
    assert "anyserve:spec_accept_length " in text
    off = SchedulerStats(num_running_reqs=0, num_queue_reqs=0, token_usage=0.0, cache_hit_rate=0.0,
                         max_total_tokens=1, available_tokens=1, evictable_tokens=0)
    ServerMetrics().update_scheduler_stats(off)


def test_server_info_reports_the_accept_length():
    from fastapi.testclient import TestClient

    from engine.entrypoints.http_server import build_app
    from fake_tokenizer_manager import FakeTokenizerManager

    tm = FakeTokenizerManager()
    spec = SpecCounts(req_steps=10, verify_steps=4, verifications=6, draft_tokens=20, accepted_tokens=5)
    real = tm.get_stats

    async def get_stats():
        stats = await real()
        stats.spec = spec
        return stats

    tm.get_stats = get_stats
    info = TestClient(build_app(tm, ServerArgs(device="cpu", **SPEC))).get("/get_server_info").json()
    assert info["speculative_algorithm"] == "NGRAM"
    assert info["internal_states"][0]["avg_spec_accept_length"] == pytest.approx(1.5)
    assert info["internal_states"][0]["spec_accepted_tokens"] == 5


def test_flags_and_their_validation():
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag in ("--speculative-algorithm", "--speculative-num-draft-tokens",
                 "--speculative-ngram-min-match-window-size", "--speculative-ngram-max-match-window-size"):
        assert flag in text
    args = ServerArgs.from_cli_args(parser.parse_args(["--speculative-algorithm", "NGRAM",
                                                       "--speculative-num-draft-tokens", "6"]))
    assert args.speculative_algorithm == "NGRAM" and args.speculative_num_draft_tokens == 6
    assert ServerArgs().speculative_algorithm is None
    for bad, msg in ((dict(speculative_algorithm="EAGLE"), "--speculative-algorithm"),
                     (dict(speculative_num_draft_tokens=0), "must be >= 1"),
                     (dict(speculative_ngram_min_match_window_size=5, speculative_ngram_max_match_window_size=3),
                      "--speculative-ngram-min-match-window-size")):
        with pytest.raises(ValueError, match=msg):
            ServerArgs(**bad)
