"""--enable-mixed-chunk: the running requests decode inside each prefill batch (one forward pass,
a one-token extend each over its cache). Outputs must be the plain scheduler's, with the overlap
scheduler on and off (the decoding rows' inputs then come from the device's future slots),
through chunked prompts, penalties, grammars, logprobs, retraction and aborts; and the
lof (longest output first) policy."""
from __future__ import annotations

import json

import pytest

from engine import Engine
from engine.scheduler import scheduler as scheduler_module
from engine.scheduler.policy import SchedulePolicy
from engine.scheduler.req import Req
from engine.sampling.sampling_params import SamplingParams
from engine.server_args import ServerArgs
from test_overlap import _req, _run, _scheduler, _stop_id, _workload

# few running requests and short chunks: requests keep arriving in the batch while others decode
_SMALL = dict(max_running_requests=3, chunked_prefill_size=24)


def _compare(want: dict, got: dict) -> None:
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        # batches differ, so float sums may differ in the last bits
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid
        assert got[rid]["input"] == pytest.approx(want[rid]["input"], abs=1e-4), rid


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_chunk_equals_plain_loop(llama_tiny, overlap):
    stop_id = _stop_id(llama_tiny)
    want = _run(_scheduler(llama_tiny, overlap=False, **_SMALL), _workload(stop_id))
    s = _scheduler(llama_tiny, overlap=overlap, enable_mixed_chunk=True, **_SMALL)
    assert s.mix_chunk
    got = _run(s, _workload(stop_id))
    _compare(want, got)
    t = s.clock.totals
    # decode tokens really rode in prefill steps, and every generated token is accounted for
    assert t.mixed_decode_tokens > 10
    generated = sum(len(v["ids"]) for v in got.values())
    first_tokens = sum(1 for v in got.values() if v["ids"])
    assert t.decode_tokens + t.mixed_decode_tokens >= generated - first_tokens
    assert "decoded in them" in t.describe()


def test_mixed_chunk_shrinks_the_chunk_by_the_running_requests(llama_tiny, monkeypatch):
    """A prefill step carries at most chunked_prefill_size - running new prompt tokens."""
    seen = []
    real = scheduler_module.log_prefill

    def spy(new_seqs, new_tokens, cached, usage, running, queued):
        seen.append((new_tokens, running))
        real(new_seqs, new_tokens, cached, usage, running, queued)

    monkeypatch.setattr(scheduler_module, "log_prefill", spy)
    reqs = [_req(f"r{i}", [(5 * i + j) % 1500 + 10 for j in range(40)], max_new_tokens=12, temperature=0,
                 ignore_eos=True) for i in range(4)]
    _run(_scheduler(llama_tiny, overlap=True, enable_mixed_chunk=True, max_running_requests=4,
                    chunked_prefill_size=32), reqs)
    assert any(running for _, running in seen)
    for new_tokens, running in seen:
        assert new_tokens <= max(32 - running, 1), seen


def test_mixed_chunk_with_penalties_and_grammars(llama_tiny):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})

    def reqs():
        return [_req("json", [10, 11, 12], max_new_tokens=24, temperature=0.7, seed=1, json_schema=schema),
                _req("yes-no", [16, 17], max_new_tokens=24, temperature=0.9, seed=2, regex="(yes|no)"),
                _req("pen", [10, 11, 12, 11], max_new_tokens=20, temperature=0.9, seed=7, frequency_penalty=0.6,
                     presence_penalty=0.5, repetition_penalty=1.4, ignore_eos=True, logprobs=2),
                _req("long", [(3 * j) % 1500 + 10 for j in range(60)], max_new_tokens=10, temperature=0,
                     ignore_eos=True),
                _req("ebnf", [20], max_new_tokens=16, temperature=0, ebnf='root ::= "x" [0-9]+'),
                _req("free", [13, 14, 15], max_new_tokens=24, temperature=0, ignore_eos=True)]

    kw = dict(max_running_requests=2, chunked_prefill_size=16)
    want = _run(_scheduler(llama_tiny, overlap=False, **kw), reqs())
    for overlap in (False, True):
        s = _scheduler(llama_tiny, overlap=overlap, enable_mixed_chunk=True, **kw)
        _compare(want, _run(s, reqs()))
        assert s.clock.totals.mixed_decode_tokens > 0


def test_mixed_chunk_with_prompt_logprobs(llama_tiny):
    """Prompts that want their own logprobs (chunked, some arriving while others decode): the
    prompt rows come before the decoding rows, and every value is the plain loop's."""
    import dataclasses

    def reqs():
        out = []
        for i in range(6):
            r = _req(f"p{i}", [(13 * i + j) % 1500 + 10 for j in range(30 + 7 * i)], logprobs=2,
                     max_new_tokens=6 + i, temperature=0, ignore_eos=True)
            out.append(dataclasses.replace(r, logprob_start_len=3 * i) if i % 2 == 0 else r)
        return out

    kw = dict(max_running_requests=2, chunked_prefill_size=20)
    want = _run(_scheduler(llama_tiny, overlap=False, **kw), reqs())
    assert all(len(want[f"p{i}"]["input"]) == 30 + 7 * i - 3 * i for i in (0, 2, 4))
    for overlap in (False, True):
        s = _scheduler(llama_tiny, overlap=overlap, enable_mixed_chunk=True, **kw)
        _compare(want, _run(s, reqs()))
        assert s.clock.totals.mixed_decode_tokens > 0


def test_mixed_chunk_retraction_and_aborts_free_everything(llama_tiny):
    def reqs():
        return [_req(f"r{i}", [(11 * i + j) % 1500 + 10 for j in range(20 + i)], max_new_tokens=40,
                     temperature=0, ignore_eos=True) for i in range(12)]

    kw = dict(max_total_tokens=256, max_running_requests=8, chunked_prefill_size=32)
    want = _run(_scheduler(llama_tiny, overlap=False, **kw), reqs())
    s = _scheduler(llama_tiny, overlap=True, enable_mixed_chunk=True, **kw)
    got = _run(s, reqs())          # the harness checks that no KV leaked
    assert s.num_retractions > 0 and s.clock.totals.mixed_decode_tokens > 0
    assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in want.items()}

    s = _scheduler(llama_tiny, overlap=True, enable_mixed_chunk=True, max_running_requests=3, chunked_prefill_size=8)
    out = _run(s, reqs()[:6], abort_at={2: ["r0", "r4"], 5: ["r1"]})
    assert all(out[r]["finish"]["type"] == "abort" for r in ("r0", "r1", "r4"))
    assert all(out[r]["finish"]["type"] == "length" and len(out[r]["ids"]) == 40 for r in ("r2", "r3", "r5"))


def test_mixed_chunk_engine_matches_transformers(llama_tiny):
    from test_engine import hf_greedy, random_prompts

    path = str(llama_tiny)
    prompts = random_prompts(1000, 8, 5, 70, seed=3)
    with Engine(model_path=path, device="cpu", dtype="float32", enable_mixed_chunk=True, max_running_requests=3,
                chunked_prefill_size=32) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "ignore_eos": True,
                                                                "max_new_tokens": 10})
        assert eng.scheduler.clock.totals.mixed_decode_tokens > 0
        eng.scheduler.check_memory_whole()
    assert [o["output_ids"] for o in outs] == [hf_greedy(path, p, 10) for p in prompts]


def test_startup_line_names_policy_and_mixing(llama_tiny, caplog):
    with caplog.at_level("INFO"):
        _scheduler(llama_tiny, overlap=False, enable_mixed_chunk=True, schedule_policy="lof")
        _scheduler(llama_tiny, overlap=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scheduler ready")]
    assert "schedule_policy=lof mixed_chunk=on" in lines[0]
    assert "schedule_policy=lpm mixed_chunk=off" in lines[1]


def test_mixed_chunk_refuses_speculative_decoding():
    with pytest.raises(ValueError, match="--enable-mixed-chunk cannot be combined"):
        ServerArgs(model_path="x", enable_mixed_chunk=True, speculative_algorithm="NGRAM").validate()


class _NoTree:
    root = None


def test_lof_orders_by_remaining_output_budget():
    def req(rid, max_new, t, out=0):
        r = Req(rid, [1, 2, 3], SamplingParams.from_dict({"max_new_tokens": max_new}), seed=0,
                arrival_time=t)
        r.output_ids = [5] * out
        return r

    waiting = [req("a", 10, 0.0), req("b", 500, 1.0), req("c", None, 2.0), req("d", 500, 0.5),
               req("e", 600, 0.2, out=200)]
    order = [r.rid for r in SchedulePolicy("lof", _NoTree()).sort(waiting)]
    # unbounded first; then by tokens left (e: 600 - 200 = 400), ties by arrival
    assert order == ["c", "d", "b", "e", "a"]
