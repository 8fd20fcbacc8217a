"""Prompt sets for ``anyserve bench serving``, built from random token ids of the tokenizer.

``random``: independent prompts of random lengths. ``generated-shared-prefix``: groups of
prompts that share a long system prompt (the radix cache's best case).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np


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


def sample_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed)
    if args.dataset == "generated-shared-prefix":
        return shared_prefix_requests(tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group,
                                      args.gsp_system_prompt_len, args.gsp_question_len, args.gsp_output_len,
                                      args.seed)
    raise ValueError(f"--dataset must be random or generated-shared-prefix, got {args.dataset!r}")
