"""Prompt (input) token logprobs, SGLang's logprob_start_len: each prompt token's log-probability
given the tokens before it, equal to transformers' log-softmax at the position before, through
chunked prefill, the radix cache, page sizes > 1, retraction and the overlap scheduler."""
from __future__ import annotations

import random

import pytest
import torch

from engine import Engine
from engine.entrypoints.tokenizer_manager import TokenizerManager
from engine.io_struct import GenerateRequest, TokenizedGenerateReq
from engine.sampling.sampling_params import SamplingParams
from engine.scheduler.scheduler import Scheduler
from engine.server_args import ServerArgs
from scheduler_harness import drive
from hf_reference import hf_model

TOL = 1e-4
_HF: dict = {}


def hf_logprobs(path, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32: row j is log p(next token | ids[: j + 1])."""
    if path not in _HF:
        _HF[path] = hf_model(path)
    with torch.inference_mode():
        return torch.log_softmax(_HF[path](torch.tensor([ids])).logits[0].float(), dim=-1)


def prompts(n_tokens: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1500) for _ in range(n)] for n in n_tokens]


def scheduler(path, overlap: bool = False, **kw) -> Scheduler:
    s = Scheduler(ServerArgs(model_path=str(path), device="cpu", dtype="float32", log_level="warning", **kw))
    s.overlap = overlap
    return s


def req(rid: str, ids: list[int], start: int, top: int = 0, **params) -> TokenizedGenerateReq:
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 3, **params}
    return TokenizedGenerateReq(rid=rid, input_ids=ids, sampling_params=SamplingParams.from_dict(params),
                                return_logprob=True, top_logprobs_num=top, logprob_start_len=start, stream=True)


def run(s: Scheduler, reqs: list[TokenizedGenerateReq], abort_at: dict[int, str] | None = None) -> dict:
    """Every request's outputs, summed over the stream; checks that no KV leaked."""
    return drive(s, reqs, {step: [rid] for step, rid in (abort_at or {}).items()}, max_steps=2000)


def check_against_hf(path, ids: list[int], start: int, got: list, top: list = (), k: int = 0) -> None:
    ref = hf_logprobs(path, ids)
    assert len(got) == len(ids) - start, f"{len(got)} prompt logprobs for positions {start}..{len(ids) - 1}"
    for i, lp in enumerate(got):
        pos = start + i
        if pos == 0:
            assert lp is None and (not top or top[i] is None)
            continue
        assert lp == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=TOL), f"position {pos}"
        if k:
            want_v, want_i = ref[pos - 1].topk(k)
            assert [t for _, t in top[i]] == want_i.tolist(), f"top-{k} at position {pos}"
            assert [v for v, _ in top[i]] == pytest.approx(want_v.tolist(), abs=TOL)


@pytest.mark.parametrize("page_size,chunk,overlap", [(1, -1, False), (4, 16, False), (4, 16, True),
                                                     (16, 8, True)])
def test_prompt_logprobs_match_transformers(llama_tiny, page_size, chunk, overlap):
    """Several prompts in one batch with different starts, whole or in chunks of `chunk` tokens."""
    ps = prompts([40, 23, 70, 9])
    starts = [0, 5, 69, 1]
    s = scheduler(llama_tiny, overlap, page_size=page_size, chunked_prefill_size=chunk)
    out = run(s, [req(f"r{i}", p, st, top=3 if i % 2 == 0 else 0) for i, (p, st) in enumerate(zip(ps, starts))])
    for i, (p, st) in enumerate(zip(ps, starts)):
        d = out[f"r{i}"]
        check_against_hf(llama_tiny, p, st, d["input"], d["input_top"], 3 if i % 2 == 0 else 0)
        assert len(d["ids"]) == 3 and d["finish"]["type"] == "length"
    if chunk > 0:
        assert s.forward_ct > 6     # the prompts really were split


@pytest.mark.parametrize("page_size", [1, 4])
def test_cached_prefix_is_recomputed_from_logprob_start(llama_tiny, page_size):
    """A prefix already in the radix cache still gets its logprobs: the match stops before the
    first position whose logits score a prompt token, and the KV goes back to the cache."""
    shared = prompts([48], seed=3)[0]
    a, b = shared + [7, 8, 9], shared + [11, 12, 13, 14]
    s = scheduler(llama_tiny, page_size=page_size)
    run(s, [req("warm", a, -1)])                          # no prompt logprobs: caches `shared`
    out = run(s, [req("from-0", b, 0), req("from-21", b[:-1] + [15], 21)])
    check_against_hf(llama_tiny, b, 0, out["from-0"]["input"])
    check_against_hf(llama_tiny, b[:-1] + [15], 21, out["from-21"]["input"])
    assert out["from-0"]["cached"] == 0
    assert 0 < out["from-21"]["cached"] <= 20
    again = run(s, [req("plain", b + [16], -1)])           # the recomputed KV went to the cache
    assert again["plain"]["cached"] >= len(b) - page_size


@pytest.mark.parametrize("overlap", [False, True])
def test_max_new_tokens_zero_scores_the_prompt_only(llama_tiny, overlap):
    p = prompts([37])[0]
    s = scheduler(llama_tiny, overlap, chunked_prefill_size=16)
    out = run(s, [req("score", p, 0, top=2, max_new_tokens=0), req("gen", p[:20], 3)])
    assert out["score"]["ids"] == [] and out["score"]["finish"] == {"type": "length", "length": 0}
    check_against_hf(llama_tiny, p, 0, out["score"]["input"], out["score"]["input_top"], 2)
    check_against_hf(llama_tiny, p[:20], 3, out["gen"]["input"])
    plain = run(s, [req("no-logprobs", p, -1, max_new_tokens=0)])   # nothing to run: finished at once
    assert plain["no-logprobs"]["finish"]["type"] == "length" and plain["no-logprobs"]["input"] == []


def test_prompt_only_request_aborted_in_flight_frees_its_kv(llama_tiny):
    p = prompts([40])[0]
    s = scheduler(llama_tiny, overlap=True, chunked_prefill_size=16)
    out = run(s, [req("a", p, 0, max_new_tokens=0), req("b", p[:30], 0, max_new_tokens=0)],
              abort_at={3: "a"})
    assert out["a"]["finish"]["type"] == "abort"
    assert out["b"]["finish"]["type"] == "length"


@pytest.mark.parametrize("overlap", [False, True])
def test_retracted_requests_do_not_repeat_prompt_logprobs(llama_tiny, overlap):
    ps = [[(11 * i + j) % 1500 + 10 for j in range(20 + i)] for i in range(12)]
    s = scheduler(llama_tiny, overlap, max_total_tokens=256, max_running_requests=8)
    out = run(s, [req(f"r{i}", p, i % 3, max_new_tokens=40) for i, p in enumerate(ps)])
    assert s.num_retractions > 0
    for i, p in enumerate(ps):
        check_against_hf(llama_tiny, p, i % 3, out[f"r{i}"]["input"])


def test_overlap_equals_plain_loop(llama_tiny):
    ps = prompts([33, 50, 12, 64], seed=5)
    make = lambda: [req(f"r{i}", p, 2 * i, top=2, max_new_tokens=5 + i) for i, p in enumerate(ps)]  # noqa: E731
    plain = run(scheduler(llama_tiny, chunked_prefill_size=24, page_size=4), make())
    overlapped = run(scheduler(llama_tiny, True, chunked_prefill_size=24, page_size=4), make())
    assert overlapped == plain


def test_logprob_start_len_outside_the_prompt_is_rejected(llama_tiny):
    s = scheduler(llama_tiny)
    out = run(s, [req("far", [5, 6, 7], 3)])
    assert out["far"]["finish"]["type"] == "abort" and "logprob_start_len" in out["far"]["finish"]["message"]
    start = TokenizerManager.prompt_logprob_start
    assert start(GenerateRequest(return_logprob=True, logprob_start_len=-1), 5) == 4   # SGLang's default
    assert start(GenerateRequest(return_logprob=True, logprob_start_len=None), 5) == -1
    assert start(GenerateRequest(return_logprob=False, logprob_start_len=2), 5) == -1
    for bad in (5, 9, -2):
        with pytest.raises(ValueError, match="logprob_start_len"):
            start(GenerateRequest(return_logprob=True, logprob_start_len=bad), 5)


def test_engine_generate_returns_sglang_meta_info(llama_tiny):
    ps = prompts([12, 15])
    with Engine(model_path=str(llama_tiny), device="cpu", dtype="float32") as eng:
        outs = eng.generate(input_ids=ps, sampling_params={"max_new_tokens": 2, "temperature": 0},
                            return_logprob=True, top_logprobs_num=2, logprob_start_len=[0, 4])
        for p, start, o in zip(ps, (0, 4), outs):
            meta = o["meta_info"]
            toks = meta["input_token_logprobs"]
            assert [t for _, t, _ in toks] == p[start:]
            assert all(isinstance(text, str) for _, _, text in toks)
            check_against_hf(llama_tiny, p, start, [lp for lp, _, _ in toks])
            assert len(meta["input_top_logprobs"]) == len(toks)
            assert all(len(row) == 2 for row in meta["input_top_logprobs"] if row is not None)
        default = eng.generate(input_ids=ps[0], sampling_params={"max_new_tokens": 1}, return_logprob=True,
                               logprob_start_len=-1)
        assert [t for _, t, _ in default["meta_info"]["input_token_logprobs"]] == ps[0][-1:]
        assert "input_token_logprobs" not in eng.generate(input_ids=ps[0], sampling_params={"max_new_tokens": 1},
                                                          return_logprob=True)["meta_info"]
        with pytest.raises(ValueError, match="logprob_start_len"):
            eng.generate(input_ids=ps[0], return_logprob=True, logprob_start_len=12)
        eng.scheduler.check_memory_whole()
