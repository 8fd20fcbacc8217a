"""TorchSampler and SamplingBatchInfo: greedy, seeds, distributions, penalties, masks, logprobs."""
from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from backends.cpu.torch_sampler import TorchSampler, counter_hashes, rng_keys, topk_rows, uniform
from engine.sampling.penalties import PenaltyBatch
from engine.sampling.sampling_batch_info import SamplingBatchInfo
from engine.sampling.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_info(params, *, vocab, seeds=None, steps=None, output_ids=None, prompt_ids=None,
              banned=None, top_logprobs=None, return_logprob=None, pending=()) -> SamplingBatchInfo:
    n = len(params)
    return SamplingBatchInfo.build(
        params, seeds=seeds if seeds is not None else list(range(n)),
        steps=steps if steps is not None else [0] * n,
        output_ids=output_ids or [[] for _ in range(n)], prompt_ids=prompt_ids or [[] for _ in range(n)],
        banned_token_ids=banned or [[] for _ in range(n)],
        top_logprobs_nums=top_logprobs or [0] * n, return_logprob=return_logprob or [False] * n,
        vocab_size=vocab, device=CPU, pending=pending)


def sp(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


# A small head forces every path: the head race, the wider head, the full sort and the tail stage.
SAMPLERS = {
    "default": lambda v: TorchSampler(v, CPU),
    "narrow_head": lambda v: TorchSampler(v, CPU, head_size=3, wide_head_size=6),
    "grouped_head": lambda v: TorchSampler(v, CPU, head_size=8, wide_head_size=32),
}


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    out = TorchSampler(50, CPU).sample(logits.clone(), make_info([sp(temperature=0)] * 8, vocab=50))
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy_at_any_temperature(temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 40)
    info = make_info([sp(temperature=temperature, top_k=1)] * 16, vocab=40)
    out = TorchSampler(40, CPU).sample(logits.clone(), info)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_bf16_logits_accepted():
    torch.manual_seed(2)
    logits = torch.randn(4, 30).to(torch.bfloat16)
    out = TorchSampler(30, CPU).sample(logits, make_info([sp(temperature=0)] * 4, vocab=30))
    assert torch.equal(out.next_token_ids, logits.float().argmax(-1))


def test_hash_matches_pure_python_splitmix():
    """The random stream is integer arithmetic only, hence the same on every device."""
    mask = (1 << 64) - 1

    def mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        return z ^ (z >> 31)

    def ref(seed, step, counter):
        key = mix(mix(seed & mask) ^ (step * 0x9E3779B97F4A7C15 & mask))
        z = (key ^ mix((counter + 1) * 0x9E3779B97F4A7C15 & mask)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 29)) * 0x94D049BB133111EB & mask
        return ((z >> 41) + 0.5) * 2.0 ** -23

    seeds, steps, counters = [0, -1, 2**62 + 12345, -2**63], [0, 5, 2**40, 7], [-1, 0, 1, 151935]
    keys = rng_keys(torch.tensor(seeds), torch.tensor(steps)).unsqueeze(1)
    u = uniform(keys, counter_hashes(torch.tensor(counters)))
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        for j, c in enumerate(counters):
            assert u[i, j].item() == ref(seed, step, c)


MIXED_PARAMS = [sp(temperature=0.9), sp(temperature=1.3, top_p=0.7), sp(temperature=0.8, top_k=5),
                sp(min_p=0.05), sp(temperature=1.1, top_k=20, top_p=0.95, min_p=0.01),
                sp(temperature=0), sp(temperature=2.0, top_p=0.99)]


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_same_seed_same_tokens_alone_and_in_any_batch(kind):
    vocab = 1000
    sampler = SAMPLERS[kind](vocab)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, vocab, generator=gen) * 1.5
    for seed in (7, 123456789, -5):
        for step in (0, 1, 17):
            # the request sampled alone
            alone = [sampler.sample(base.clone(), make_info([p], vocab=vocab, seeds=[seed], steps=[step]))
                     .next_token_ids.item() for p in MIXED_PARAMS]
            # the same requests among strangers, in shuffled order
            rng = random.Random(seed * 31 + step)
            rows = [(p, seed, step, base[0], i) for i, p in enumerate(MIXED_PARAMS)]
            rows += [(rng.choice(MIXED_PARAMS), rng.randrange(1 << 30), rng.randrange(100),
                      torch.randn(vocab, generator=gen) * 3, None) for _ in range(9)]
            rng.shuffle(rows)
            info = make_info([r[0] for r in rows], vocab=vocab, seeds=[r[1] for r in rows],
                             steps=[r[2] for r in rows])
            out = sampler.sample(torch.stack([r[3] for r in rows]), info).next_token_ids.tolist()
            for (_, _, _, _, i), tok in zip(rows, out):
                if i is not None:
                    assert tok == alone[i], (MIXED_PARAMS[i], seed, step)


def test_different_seeds_and_steps_differ():
    vocab = 200
    logits = torch.zeros(400, vocab)           # uniform: any repetition pattern would show
    sampler = TorchSampler(vocab, CPU)
    by_seed = sampler.sample(logits.clone(), make_info([sp()] * 400, vocab=vocab, seeds=list(range(400))))
    by_step = sampler.sample(logits.clone(), make_info([sp()] * 400, vocab=vocab, seeds=[42] * 400,
                                                      steps=list(range(400))))
    assert len(set(by_seed.next_token_ids.tolist())) > 120
    assert len(set(by_step.next_token_ids.tolist())) > 120


def analytic(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The target distribution, straight from the definitions (top-p mass under the full
    distribution, at least the top token; min-p relative to the top probability)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    ps, order = p.sort(descending=True)
    keep = torch.ones_like(ps, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    keep &= (ps.cumsum(0) - ps) < top_p
    keep &= ps >= min_p * ps[0]
    q = torch.zeros_like(p)
    q[order[keep]] = ps[keep]
    return q / q.sum()


FIXED_LOGITS = torch.tensor([0.2, 2.0, -0.3, 1.2, -1.0, 0.7, 1.5, 0.0, -0.6, 1.0, 0.5, -1.5])
DIST_CASES = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=1.6),
    "top_p": dict(top_p=0.8),
    "top_k": dict(top_k=5),
    "min_p": dict(min_p=0.1),
    "combined": dict(temperature=1.3, top_k=8, top_p=0.9, min_p=0.02),
}


def assert_matches_distribution(sampler, logits: torch.Tensor, case: dict, n: int = 20000) -> None:
    vocab = logits.numel()
    info = make_info([sp(**case)] * n, vocab=vocab, seeds=[s // 4 for s in range(n)],
                     steps=[s % 4 for s in range(n)])
    tokens = sampler.sample(logits.expand(n, vocab).clone(), info).next_token_ids
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = analytic(logits, **case) * n
    assert observed[expected == 0].sum() == 0, "drew a token the filters exclude"
    big = expected >= 5                                   # chi-square needs >= 5 expected per cell
    small = (expected > 0) & ~big
    obs = torch.cat([observed[big], observed[small].sum().view(1)])
    exp = torch.cat([expected[big], expected[small].sum().view(1)])
    if not small.any():
        obs, exp = obs[:-1], exp[:-1]
    result = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert result.pvalue > 1e-3, (case, obs.tolist(), exp.tolist())


@pytest.mark.parametrize("kind", ["default", "narrow_head"])
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_empirical_distribution_matches_analytic(kind, case):
    assert_matches_distribution(SAMPLERS[kind](FIXED_LOGITS.numel()), FIXED_LOGITS, DIST_CASES[case])


@pytest.mark.parametrize("case", ["hot", "top_p", "combined"])
def test_large_vocab_distribution_matches_analytic(case):
    """A vocabulary large enough for the grouped top-k, with a long tail."""
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(11)) * 1.5
    assert_matches_distribution(SAMPLERS["grouped_head"](3000), logits, DIST_CASES[case])


@pytest.mark.parametrize("shape", [(5, 4096), (3, 5003), (2, 700)])
def test_topk_rows_equals_torch_topk(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(12))
    x[0, :100] = float("-inf")
    for k in (1, 8, 20):
        vals, ids = topk_rows(x, k)
        ref = torch.topk(x, k, dim=-1)
        assert torch.equal(vals, ref.values) and torch.equal(x.gather(1, ids), vals)


def test_penalties_match_direct_formula():
    torch.manual_seed(4)
    vocab = 20
    logits = torch.randn(3, vocab) * 2
    params = [sp(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
              sp(), sp(repetition_penalty=0.8)]
    prompt = [[1, 2, 3, 3, vocab + 5], [4], [5, 6]]      # ids past the vocabulary are ignored
    output = [[3, 7, 7, 7, 8], [9], [6, 6, 10]]
    expected = logits.clone()
    for row, p in enumerate(params):
        for tok in (set(prompt[row]) | set(output[row])) - {vocab + 5}:
            v = expected[row, tok]
            expected[row, tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for tok in set(output[row]):
            expected[row, tok] -= output[row].count(tok) * p.frequency_penalty + p.presence_penalty
    info = make_info(params, vocab=vocab, prompt_ids=prompt, output_ids=output)
    assert info.need_penalties
    got = logits.clone()
    info.apply_logit_adjustments(got)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("seed", range(10))
def test_penalties_with_the_last_token_in_flight_equal_the_host_lists(seed):
    """Overlap scheduling: a request's last token is the step's input id on the device, not yet in
    its host list. Counting it in there gives the very logits of the plain loop (which knows it),
    whether the token is new to the request or seen before, with every mix of penalties."""
    g = torch.Generator().manual_seed(seed)
    vocab, batch = 12, 7
    params = [sp(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
              sp(frequency_penalty=-0.7), sp(presence_penalty=1.5), sp(repetition_penalty=0.8),
              sp(), sp(repetition_penalty=1.1, presence_penalty=-0.3), sp(frequency_penalty=0.2)]
    prompt = [torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
              for _ in range(batch)]
    output = [torch.randint(0, vocab, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
              for _ in range(batch)]
    output[6] = [4]                          # its only token is the one in flight: no known pairs
    pending = [bool(torch.rand(1, generator=g) < 0.7) for _ in range(batch)]
    pending[6] = True
    step_inputs = torch.tensor([o[-1] for o in output])
    logits = torch.randn(batch, vocab, generator=g) * 3
    want = logits.clone()
    make_info(params, vocab=vocab, prompt_ids=prompt, output_ids=output).apply_logit_adjustments(want)
    info = make_info(params, vocab=vocab, prompt_ids=prompt, pending=pending,
                     output_ids=[o[:-1] if p else o for o, p in zip(output, pending)])
    info.step_input_ids = step_inputs
    got = logits.clone()
    info.apply_logit_adjustments(got)
    assert torch.equal(got, want)
    info.step_input_ids = None
    with pytest.raises(ValueError, match="step's input ids"):
        info.apply_logit_adjustments(logits.clone())


def test_no_penalty_builds_nothing():
    assert PenaltyBatch.build([sp(), sp()], output_ids=[[1], [2]], prompt_ids=[[3], [4]],
                              vocab_size=10, device=CPU) is None


def test_greedy_uses_penalised_and_biased_logits():
    vocab = 10
    logits = torch.arange(vocab, dtype=torch.float32).repeat(2, 1)       # argmax 9 in both rows
    params = [sp(temperature=0, frequency_penalty=2.0), sp(temperature=0, logit_bias={3: 100})]
    info = make_info(params, vocab=vocab, output_ids=[[9], []])
    out = TorchSampler(vocab, CPU).sample(logits.clone(), info)
    assert out.next_token_ids.tolist() == [8, 3]


def test_logit_bias_adds_to_logits():
    logits = torch.zeros(2, 6)
    info = make_info([sp(logit_bias={1: 2.5, 4: -100}), sp()], vocab=6)
    info.apply_logit_adjustments(logits)
    assert logits[0].tolist() == [0, 2.5, 0, 0, -100, 0] and logits[1].tolist() == [0] * 6


def test_banned_ids_never_drawn():
    vocab, n = 8, 2000
    logits = torch.zeros(n, vocab)
    logits[:, 2] = 5.0                                                   # the favourite is banned
    info = make_info([sp(temperature=1.5)] * (n - 1) + [sp(temperature=0)], vocab=vocab,
                     banned=[[2, 5]] * n)
    tokens = TorchSampler(vocab, CPU).sample(logits, info).next_token_ids
    assert not ((tokens == 2) | (tokens == 5)).any()


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_vocab_mask_allows_only_masked_in_tokens(kind):
    vocab, n = 16, 1000
    torch.manual_seed(5)
    logits = torch.randn(n, vocab)
    info = make_info([sp(temperature=1.0)] * (n // 2) + [sp(temperature=0)] * (n // 2), vocab=vocab)
    allowed = torch.zeros(n, 12, dtype=torch.bool)       # the grammar's vocabulary is smaller
    allowed[:, [0, 4, 11]] = True
    info.vocab_mask = allowed
    tokens = SAMPLERS[kind](vocab).sample(logits, info).next_token_ids
    assert set(tokens.tolist()) == {0, 4, 11}


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_fully_masked_row_does_not_crash(kind):
    vocab = 40
    info = make_info([sp(top_p=0.9), sp(min_p=0.1), sp(), sp(temperature=0)], vocab=vocab)
    info.vocab_mask = torch.zeros(4, vocab, dtype=torch.bool)
    tokens = SAMPLERS[kind](vocab).sample(torch.randn(4, vocab), info).next_token_ids
    assert tokens.shape == (4,) and ((tokens >= 0) & (tokens < vocab)).all()


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    torch.manual_seed(6)
    vocab = 30
    logits = torch.randn(4, vocab) * 2
    params = [sp(temperature=0.5, logit_bias={0: 10}), sp(temperature=0), sp(top_p=0.5), sp()]
    info = make_info(params, vocab=vocab, top_logprobs=[3, 5, 0, 2], return_logprob=[True, True, True, False])
    assert info.need_logprobs and info.max_top_logprobs == 5
    out = TorchSampler(vocab, CPU).sample(logits.clone(), info)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.next_token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs.shape == (4, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs, ref.gather(1, out.top_logprob_ids))
    torch.testing.assert_close(out.top_logprobs, ref.topk(5, dim=-1).values)


def test_logprobs_skipped_when_not_asked():
    out = TorchSampler(10, CPU).sample(torch.randn(2, 10), make_info([sp(), sp()], vocab=10))
    assert out.logprobs is None and out.top_logprobs is None


def test_fast_path_flags():
    info = make_info([sp(temperature=0), sp(temperature=0.7, top_k=4), sp(top_p=0.9)], vocab=50)
    assert not info.is_all_greedy and not info.is_all_sampled
    assert info.need_top_k and info.need_top_p and not info.need_min_p and not info.need_penalties
    assert info.greedy_rows.tolist() == [0] and info.sample_rows.tolist() == [1, 2]
    assert info.max_top_k == 50 and not info.modifies_logits
    assert make_info([sp(temperature=0)] * 2, vocab=50).is_all_greedy


def test_build_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="seeds has 1 entries"):
        SamplingBatchInfo.build([sp(), sp()], seeds=[1], steps=[0, 0], output_ids=[[], []],
                                prompt_ids=[[], []], banned_token_ids=[[], []], top_logprobs_nums=[0, 0],
                                return_logprob=[False, False], vocab_size=10, device=CPU)


def test_two_pass_argmax_equals_argmax_with_ties_and_nan():
    from backends.cpu.torch_sampler import _argmax_chunks, argmax_rows

    assert _argmax_chunks(128256) == 192 and _argmax_chunks(151936) == 128 and _argmax_chunks(1009) == 1
    g = torch.Generator().manual_seed(0)
    for vocab in (128256, 32000, 50257):          # split, split, prime-ish (one pass)
        x = torch.randn(5, vocab, generator=g)
        x[1, 70000 % vocab] = x[1, 90 % vocab] = 1e4      # a tie across chunks: the first index wins
        x[2, 17] = x[2, 18] = 1e4                         # a tie inside one chunk
        x[3, 5000] = float("nan")                         # NaN counts as the largest, as in argmax
        x[4] = 0.0                                        # all equal: index 0
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1)), vocab
    wide = torch.randn(40, 128256, generator=g)          # many rows: one pass
    assert torch.equal(argmax_rows(wide), wide.argmax(dim=-1))
