"""Prompt sets for ``anyserve bench serving`` and ``anyserve bench offline``, built from random
token ids of the tokenizer.

``random``: independent prompts of random lengths. ``generated-shared-prefix``: groups of
prompts that share a long system prompt (the radix cache's best case). ``sharegpt-synthetic``:
prompt and output lengths drawn to match the ShareGPT benchmark set's published statistics
(the dataset itself cannot be fetched here); see ``SHAREGPT_FIT``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DATASETS = ["random", "generated-shared-prefix", "sharegpt-synthetic"]


@dataclass
class BenchRequest:
    prompt: str               # the decoded prompt (what the OpenAI backends send)
    prompt_ids: list[int]     # its token ids (what the anyserve backend sends)
    output_len: int           # max tokens, with ignore_eos: the exact output length

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def _usable_token_ids(tokenizer: Any) -> np.ndarray:
    """Every id of the vocabulary except special tokens (which decode to markup, or nothing)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no non-special tokens to build prompts from")
    return ids


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def random_requests(tokenizer: Any, num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float, seed: int) -> list[BenchRequest]:
    """Prompt and output lengths uniform in [max(1, len * range_ratio), len]."""
    _check_positive(num_prompts=num_prompts, random_input_len=input_len, random_output_len=output_len)
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    rng = np.random.default_rng(seed)
    vocab = _usable_token_ids(tokenizer)
    input_lens = rng.integers(max(1, int(input_len * range_ratio)), input_len + 1, size=num_prompts)
    output_lens = rng.integers(max(1, int(output_len * range_ratio)), output_len + 1, size=num_prompts)
    reqs = []
    for in_len, out_len in zip(input_lens.tolist(), output_lens.tolist()):
        ids = rng.choice(vocab, size=in_len).tolist()
        reqs.append(BenchRequest(prompt=tokenizer.decode(ids), prompt_ids=ids, output_len=out_len))
    return reqs


def shared_prefix_requests(tokenizer: Any, num_groups: int, prompts_per_group: int, system_prompt_len: int,
                           question_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """num_groups system prompts, each followed by prompts_per_group different questions;
    returned in a seeded random order so the groups' requests interleave."""
    _check_positive(gsp_num_groups=num_groups, gsp_prompts_per_group=prompts_per_group,
                    gsp_system_prompt_len=system_prompt_len, gsp_question_len=question_len,
                    gsp_output_len=output_len)
    rng = np.random.default_rng(seed)
    vocab = _usable_token_ids(tokenizer)
    reqs = []
    for _ in range(num_groups):
        system_ids = rng.choice(vocab, size=system_prompt_len).tolist()
        for _ in range(prompts_per_group):
            # Decoded whole (not system text + question text) so the text re-tokenizes to about
            # the same ids: two texts glued together can merge into other tokens at the seam.
            ids = system_ids + rng.choice(vocab, size=question_len).tolist()
            reqs.append(BenchRequest(prompt=tokenizer.decode(ids), prompt_ids=ids, output_len=output_len))
    return [reqs[i] for i in rng.permutation(len(reqs)).tolist()]


# ---- sharegpt-synthetic ------------------------------------------------------------------------
@dataclass(frozen=True)
class LogNormal:
    """A log-normal length distribution before filtering: exp(N(log(median), sigma^2)), rounded."""
    median: float
    sigma: float


@dataclass(frozen=True)
class ShareGPTFit:
    """Length model of ShareGPT_V3_unfiltered_cleaned_split.json as the serving benchmarks sample it.

    Those benchmarks take each conversation's first human turn as the prompt and the first answer's
    length (in the model's tokens) as the output length, and drop pairs with prompt or output under
    4 tokens, a prompt over 1,024 or prompt + output over 2,048 (vLLM's sampler; SGLang's keeps the
    same bounds by default). We draw prompt and output lengths independently from two log-normals
    and apply the same filter, so the bounds hold exactly.

    Targets (means after the filter, Llama-3 tokenizer, 1,000 sampled prompts):
      input 224, output 188 tokens -- vLLM's throughput benchmark on ShareGPT with Llama-3.1-8B,
      1,000 prompts: 39.72 req/s, 16,360.76 total tok/s, 7,468.34 output tok/s
      (https://github.com/vllm-project/vllm/pull/14036), i.e. 7468.34 / 39.72 = 188.0 output and
      (16360.76 - 7468.34) / 39.72 = 223.9 input tokens per request.
      Cross-checks: SGLang's offline benchmark on 1,000 ShareGPT prompts with Llama-3.1-8B-Instruct
      counts 233,369 input tokens (233 per prompt, https://github.com/sgl-project/sglang/pull/1968);
      SGLang's serving benchmark on 300 prompts reports 74,403 input and 61,393 output tokens (248 and
      205 per request, https://github.com/sgl-project/sglang/issues/1268).
    Shape: no published median or percentile of this filtered set was found, so sigma is an
      assumption (1.2 for prompts: many one-line questions and a long tail of pasted text; 1.0 for
      answers). The medians below were then fitted (by simulation, 400k draws) so that the means
      after the filter hit the targets; the filtered set has median 147 / 118 and p90 ~544 / ~419.
    """
    input: LogNormal = LogNormal(median=162.0, sigma=1.2)
    output: LogNormal = LogNormal(median=119.0, sigma=1.0)
    min_len: int = 4
    target_mean_input: float = 224.0
    target_mean_output: float = 188.0


SHAREGPT_FIT = ShareGPTFit()


def sharegpt_synthetic_lengths(num_prompts: int, seed: int, context_len: int = 2048,
                               fit: ShareGPTFit = SHAREGPT_FIT) -> tuple[list[int], list[int]]:
    """(input_lens, output_lens) of num_prompts requests, deterministic in seed. Pairs outside the
    benchmarks' filter are redrawn: prompt and output >= fit.min_len, prompt <= context_len // 2,
    prompt + output <= context_len (2,048 as in vLLM/SGLang; smaller values shrink the set for tiny
    models, and then the means no longer match the published ones)."""
    _check_positive(num_prompts=num_prompts)
    if context_len < 4 * fit.min_len:
        raise ValueError(f"--sharegpt-context-len must be >= {4 * fit.min_len}, got {context_len}")
    rng = np.random.default_rng(seed)
    ins: list[int] = []
    outs: list[int] = []
    while len(ins) < num_prompts:
        draw = max(64, 2 * (num_prompts - len(ins)))
        i = np.rint(rng.lognormal(math.log(fit.input.median), fit.input.sigma, draw)).astype(np.int64)
        o = np.rint(rng.lognormal(math.log(fit.output.median), fit.output.sigma, draw)).astype(np.int64)
        keep = (i >= fit.min_len) & (o >= fit.min_len) & (i <= context_len // 2) & (i + o <= context_len)
        ins.extend(i[keep].tolist())
        outs.extend(o[keep].tolist())
    return ins[:num_prompts], outs[:num_prompts]


def sharegpt_synthetic_requests(tokenizer: Any, num_prompts: int, seed: int,
                                context_len: int = 2048) -> list[BenchRequest]:
    """Random-token prompts with sharegpt_synthetic_lengths' lengths."""
    input_lens, output_lens = sharegpt_synthetic_lengths(num_prompts, seed, context_len)
    rng = np.random.default_rng(seed + 1)
    vocab = _usable_token_ids(tokenizer)
    reqs = []
    for in_len, out_len in zip(input_lens, output_lens):
        ids = rng.choice(vocab, size=in_len).tolist()
        reqs.append(BenchRequest(prompt=tokenizer.decode(ids), prompt_ids=ids, output_len=out_len))
    return reqs


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """mean, median, p90, min and max of a list of token counts (for tables and JSON)."""
    a = np.asarray(lengths, dtype=np.float64)
    if a.size == 0:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def describe_lengths(input_lens: Sequence[int], output_lens: Sequence[int]) -> str:
    """One line per side: 'input tokens: mean 224.0, median 147, p90 544 (4..1024)'."""
    lines = []
    for side, lens in (("input", input_lens), ("output", output_lens)):
        s = length_stats(lens)
        lines.append(f"{side} tokens: mean {s['mean']:.1f}, median {s['median']:.0f}, p90 {s['p90']:.0f} "
                     f"({s['min']:.0f}..{s['max']:.0f}), total {int(sum(lens))}")
    return "\n".join(lines)


def sample_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    if args.dataset == "sharegpt-synthetic":
        return sharegpt_synthetic_requests(tokenizer, args.num_prompts, args.seed, args.sharegpt_context_len)
    if args.dataset == "random":
        return random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed)
    if args.dataset == "generated-shared-prefix":
        return shared_prefix_requests(tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group,
                                      args.gsp_system_prompt_len, args.gsp_question_len, args.gsp_output_len,
                                      args.seed)
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
