"""The overlap scheduler (launch step N+1, then read step N's tokens) gives exactly the plain loop's
outputs. On the CPU the device is synchronous, so overlap is off by default there; these tests turn
it on to run the same bookkeeping the GPU runs (tokens fed from the device-side future slots, one
step of lag in finishing, grammar masks built from the token read back during the next forward,
penalties counting the token in flight, retraction, aborts)."""
from __future__ import annotations

import json
import re
import time

import pytest

from engine.io_struct import TokenizedGenerateReq
from engine.sampling.sampling_params import SamplingParams
from engine.scheduler.scheduler import Scheduler
from engine.server_args import ServerArgs
from engine.tokenizer import load_tokenizer
from scheduler_harness import drive


def _scheduler(model_path, overlap: bool, **kw) -> Scheduler:
    args = ServerArgs(model_path=str(model_path), log_level="warning", **{"device": "cpu", **kw})
    s = Scheduler(args)
    s.overlap = overlap
    return s


_run = drive


def _req(rid: str, ids: list[int], stream: bool = True, logprobs: int = 0, **params) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid=rid, input_ids=ids, sampling_params=SamplingParams.from_dict(params),
                                stream=stream, return_logprob=logprobs > 0, top_logprobs_num=logprobs)


def _text(model_path, ids: list[int]) -> str:
    return load_tokenizer(str(model_path)).decode(ids)


def _workload(stop_id: int) -> list[TokenizedGenerateReq]:
    p = [[(7 * i + j) % 1500 + 10 for j in range(5 + 9 * i)] for i in range(10)]
    return [
        _req("greedy", p[0], max_new_tokens=20, temperature=0, ignore_eos=True),
        _req("greedy-1", p[1], max_new_tokens=1, temperature=0, ignore_eos=True),
        _req("seeded", p[2], max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=11, ignore_eos=True),
        _req("min-p", p[3], max_new_tokens=12, temperature=1.2, min_p=0.05, seed=5, ignore_eos=True, logprobs=3),
        _req("stop-id", p[0] + [3], max_new_tokens=30, temperature=0, stop_token_ids=[stop_id]),
        _req("min-new", p[0] + [4], max_new_tokens=30, temperature=0, stop_token_ids=[stop_id], min_new_tokens=8),
        _req("penalties", p[4], max_new_tokens=14, temperature=0.8, seed=3, frequency_penalty=0.7,
             presence_penalty=0.4, repetition_penalty=1.3, ignore_eos=True),
        _req("no-stream", p[5], stream=False, max_new_tokens=9, temperature=0, ignore_eos=True, logprobs=2),
        _req("shared-a", p[6] * 3, max_new_tokens=10, temperature=0, ignore_eos=True),
        _req("shared-b", p[6] * 3 + [5, 6], max_new_tokens=10, temperature=0, ignore_eos=True),
    ]


def _stop_id(model_path, **kw) -> int:
    """A token the workload's "stop-id" request reaches greedily at its 5th token (or earlier)."""
    probe = _run(_scheduler(model_path, overlap=False, **kw), [_req("probe", [(7 * j) % 1500 + 10 for j in range(5)] + [3],
                                                             max_new_tokens=30, temperature=0, ignore_eos=True)])
    return probe["probe"]["ids"][4]


def test_overlap_equals_plain_loop(llama_tiny):
    stop_id = _stop_id(llama_tiny)
    want = _run(_scheduler(llama_tiny, overlap=False), _workload(stop_id))
    s = _scheduler(llama_tiny, overlap=True)
    got = _run(s, _workload(stop_id))
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        # batches differ between the loops, so float sums may differ in the last bits
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid
        assert [[t for _, t in row] for row in got[rid]["top"]] == [[t for _, t in row] for row in want[rid]["top"]]
    assert want["stop-id"]["finish"]["type"] == "stop" and len(want["stop-id"]["ids"]) <= 5
    assert len(want["min-new"]["ids"]) >= 8
    assert got["no-stream"]["chunks"] == 1
    # it really overlapped (steps launched before the previous one's tokens were read)
    assert s.num_overlapped_steps >= 3


def test_overlap_with_penalties_equals_plain_loop(llama_tiny):
    """Penalties need every earlier token; the one in flight is counted in on the device, so
    requests with penalties overlap too and sample exactly what the plain loop samples."""
    def reqs():
        return [_req("all", [10, 11, 12, 11], max_new_tokens=20, temperature=0.9, seed=7, frequency_penalty=0.6,
                     presence_penalty=0.5, repetition_penalty=1.4, ignore_eos=True, logprobs=2),
                _req("rep", [13, 14], max_new_tokens=16, temperature=0, repetition_penalty=1.8, ignore_eos=True),
                _req("neg", [15, 16, 17], max_new_tokens=16, temperature=0, frequency_penalty=-1.5,
                     presence_penalty=-1.0, ignore_eos=True),
                _req("none", [18], max_new_tokens=12, temperature=0, ignore_eos=True)]

    want = _run(_scheduler(llama_tiny, overlap=False), reqs())
    s = _scheduler(llama_tiny, overlap=True)
    got = _run(s, reqs())
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid
    assert s.num_overlapped_steps >= 15        # every decode step after the first overlapped
    # the penalties did something: greedy with a strong negative frequency penalty repeats
    assert len(set(want["neg"]["ids"])) < len(want["neg"]["ids"])


def test_overlap_penalties_count_the_token_in_flight(llama_tiny):
    """With the model's logits zeroed, the greedy tokens come from logit_bias and the penalties
    alone, so each step depends on the token just before it, which under overlap is still in
    flight: both loops must give the sequence worked out by hand."""
    import torch

    vocab_probe = _scheduler(llama_tiny, overlap=False)
    vocab = vocab_probe.runner.vocab_size

    def expected(bias: dict, n: int, freq=0.0, pres=0.0, rep=1.0) -> list[int]:
        out = []
        for _ in range(n):
            logits = torch.zeros(vocab)
            for t, b in bias.items():
                logits[t] += b
            for t in set(out):
                v = logits[t]
                logits[t] = v / rep if v > 0 else v * rep
                logits[t] -= out.count(t) * freq + pres
            out.append(int(logits.argmax()))
        return out

    cases = {"freq": dict(bias={5: 1.0, 6: 0.9}, freq=0.3), "pres": dict(bias={5: 1.0, 6: 0.9}, pres=0.5),
             "rep": dict(bias={5: 1.0, 6: 0.8}, rep=2.0)}

    def reqs():
        return [_req(rid, [10 + i, 11], max_new_tokens=10, temperature=0, ignore_eos=True,
                     logit_bias={str(t): b for t, b in c["bias"].items()}, frequency_penalty=c.get("freq", 0.0),
                     presence_penalty=c.get("pres", 0.0), repetition_penalty=c.get("rep", 1.0))
                for i, (rid, c) in enumerate(cases.items())]

    def zero_logits(s: Scheduler) -> Scheduler:
        real = s.runner.model.forward
        s.runner.model.forward = lambda *a, **kw: torch.zeros_like(real(*a, **kw))
        return s

    plain = _run(zero_logits(vocab_probe), reqs())
    s = zero_logits(_scheduler(llama_tiny, overlap=True))
    got = _run(s, reqs())
    for rid, c in cases.items():
        want = expected(c["bias"], 10, c.get("freq", 0.0), c.get("pres", 0.0), c.get("rep", 1.0))
        assert want[:3] == [5, 6, 5], want          # the previous token decides each step
        assert plain[rid]["ids"] == want, rid
        assert got[rid]["ids"] == want, rid
    assert s.num_overlapped_steps >= 8


def test_overlap_with_grammar_equals_plain_loop(llama_tiny):
    """A grammar's mask needs the token in flight: the step's forward is launched first and the
    token read back while it runs, so grammar batches overlap too, with the plain loop's outputs
    (grammars that end early, one that ends while its next step is in flight, penalties, free rows)."""
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})

    def reqs():
        return [_req("json", [10, 11, 12], max_new_tokens=24, temperature=0.7, seed=1, json_schema=schema),
                _req("yes-no", [16, 17], max_new_tokens=24, temperature=0.9, seed=2, regex="(yes|no)"),
                _req("long", [18, 19], max_new_tokens=30, temperature=1.0, seed=4, regex="[a-z ]{40,60}",
                     frequency_penalty=0.5, repetition_penalty=1.2, logprobs=2),
                _req("ebnf", [20], max_new_tokens=16, temperature=0, ebnf='root ::= "x" [0-9]+'),
                _req("free", [13, 14, 15], max_new_tokens=24, temperature=0, ignore_eos=True)]

    want = _run(_scheduler(llama_tiny, overlap=False), reqs())
    s = _scheduler(llama_tiny, overlap=True)
    got = _run(s, reqs())
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid
    assert want["yes-no"]["finish"]["type"] == "stop" and len(want["yes-no"]["ids"]) <= 3
    assert want["long"]["finish"]["type"] == "stop"      # the grammar let it end at 40+ characters
    assert re.fullmatch("[a-z ]{40,60}", _text(llama_tiny, want["long"]["ids"][:-1]))
    assert want["ebnf"]["finish"]["type"] == "length" and len(want["ebnf"]["ids"]) == 16
    # every decode step after the first overlapped, grammar rows in the batch or not
    assert s.num_overlapped_steps >= 22


def test_overlap_retraction_in_a_small_pool(llama_tiny):
    def reqs():
        return [_req(f"r{i}", [(11 * i + j) % 1500 + 10 for j in range(20 + i)], max_new_tokens=40,
                     temperature=0, ignore_eos=True) for i in range(12)]

    kw = dict(max_total_tokens=256, max_running_requests=8)
    plain = _scheduler(llama_tiny, overlap=False, **kw)
    want = _run(plain, reqs())
    s = _scheduler(llama_tiny, overlap=True, **kw)
    got = _run(s, reqs())
    assert s.num_retractions > 0 and plain.num_retractions > 0
    assert s.num_overlapped_steps > 20
    assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in want.items()}


def test_overlap_abort_in_flight_frees_everything(llama_tiny):
    s = _scheduler(llama_tiny, overlap=True)
    reqs = [_req(f"r{i}", [20 + i] * (8 + i), max_new_tokens=50, temperature=0, ignore_eos=True) for i in range(4)]
    out = _run(s, reqs, abort_at={3: ["r1"], 6: ["r2", "r3"]})
    assert out["r1"]["finish"]["type"] == "abort" and out["r2"]["finish"]["type"] == "abort"
    assert out["r0"]["finish"]["type"] == "length" and len(out["r0"]["ids"]) == 50
    assert len(out["r1"]["ids"]) < 50


def test_flush_right_after_the_last_output(llama_tiny):
    """A request ended by a stop token leaves one step in flight after its last output (it was
    launched before the token was read); a flush then drains it instead of refusing."""
    prompt = [30, 31, 32]
    plain = _run(_scheduler(llama_tiny, overlap=False),
                 [_req("p", prompt, max_new_tokens=8, temperature=0, ignore_eos=True)])["p"]["ids"]
    s = _scheduler(llama_tiny, overlap=True)
    s.handle(_req("a", prompt, max_new_tokens=50, temperature=0, stop_token_ids=[plain[3]]))
    done = False
    while not done:
        s.step()
        o = s.take_outputs()
        done = o is not None and o.finished_reasons[0] is not None
    assert s.in_flight is not None and not s.is_idle()
    assert s.flush_cache().success
    s.check_memory_whole()


@pytest.mark.parametrize("overlap", [False, True])
def test_step_clock_counts_every_step_and_logs_batches(llama_tiny, overlap, caplog):
    """Every sampled step is timed as prefill or decode; decoded tokens add up to what was
    generated; the SGLang-style 'Prefill batch' / 'Decode batch' lines are logged; gen_throughput
    is set while requests run and 0 once idle."""
    s = _scheduler(llama_tiny, overlap, decode_log_interval=5)
    prompts = [[(3 * i + j) % 1500 + 10 for j in range(6 + 4 * i)] for i in range(4)]
    reqs = [_req(f"r{i}", p, max_new_tokens=12 + 3 * i, temperature=0, ignore_eos=True)
            for i, p in enumerate(prompts)]
    for r in reqs:
        s.handle(r)
    time.sleep(1.0)       # idle before the first step: not part of the first window's throughput
    throughput_while_running = 0.0
    loop_start = time.time()
    with caplog.at_level("INFO", logger="engine.scheduler"):
        while not s.is_idle():
            s.step()
            s.take_outputs()
            throughput_while_running = max(throughput_while_running, s.stats().gen_throughput)
    t = s.stats().step_totals
    generated = sum(12 + 3 * i for i in range(4))
    assert t.prefill_steps >= 1 and t.prefill_tokens == sum(map(len, prompts))
    # each request's first token comes from its prefill, the rest from decode steps
    assert t.decode_tokens == generated - len(reqs)
    assert t.decode_steps >= max(12 + 3 * i for i in range(4)) - 1
    assert t.prefill_seconds > 0 and t.decode_seconds > 0
    assert "prefill" in t.describe() and "ms/step" in t.describe()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Prefill batch. #new-seq: 4, #new-token: %d" % sum(map(len, prompts))) for m in lines)
    decode_records = [r for r in caplog.records if r.getMessage().startswith("Decode batch. #running-req:")]
    assert len(decode_records) == t.decode_steps // 5
    # The first window decoded 5 steps x 4 requests between the loop's start and its log line; had
    # it counted the idle second before, its throughput would be below 20 / (that time + 1 s).
    first = float(re.search(r"gen throughput \(token/s\): ([0-9.]+)", decode_records[0].getMessage()).group(1))
    busy = decode_records[0].created - loop_start
    assert first > 20 / (busy + 0.5), (decode_records[0].getMessage(), busy)
    assert throughput_while_running > 0 and s.stats().gen_throughput == 0.0
