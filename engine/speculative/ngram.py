"""N-gram (prompt-lookup) drafts: the tokens that followed the most recent earlier occurrence of
the longest suffix of a request's own tokens (prompt + output), between a min and max size."""
from __future__ import annotations

import numpy as np

_EMPTY = np.empty(0, dtype=np.int64)


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` draft tokens for the sequence ``tokens`` [L] int64.

    The suffix tokens[L-n:] with the largest n in [min_n, max_n] that also ends at some earlier
    position i < L - 1 (occurrences may overlap the suffix) picks the largest such i, and the draft
    is tokens[i+1 : i+1+k] (fewer when the sequence ends first). Empty when no suffix of at least
    min_n tokens occurred before."""
    n_tok = tokens.shape[0]
    if k < 1 or n_tok < min_n + 1:
        return _EMPTY
    # ends: positions i < L-1 whose token equals the last one, i.e. where a match of length 1
    # ends; then keep those whose match goes one token further back, while any are left.
    ends = np.flatnonzero(tokens[: n_tok - 1] == tokens[n_tok - 1])
    best = ends[-1] if len(ends) and min_n <= 1 else -1
    depth = 1
    while len(ends) and depth < max_n:
        ends = ends[ends >= depth]
        ends = ends[tokens[ends - depth] == tokens[n_tok - 1 - depth]]
        depth += 1
        if len(ends) and depth >= min_n:
            best = ends[-1]
    if best < 0:
        return _EMPTY
    return tokens[best + 1: best + 1 + k]


class TokenHistory:
    """A request's tokens as a growing int64 array, so proposing costs no list conversion of the
    whole sequence per step (tokens are only ever appended)."""

    def __init__(self) -> None:
        self._buf = np.empty(256, dtype=np.int64)
        self._len = 0

    def sync(self, prompt: list[int], output: list[int]) -> np.ndarray:
        """The array of prompt + output, appending what is new since the last call."""
        total = len(prompt) + len(output)
        if total > self._buf.shape[0]:
            grown = np.empty(max(total, 2 * self._buf.shape[0]), dtype=np.int64)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        if self._len < len(prompt):
            self._buf[self._len: len(prompt)] = prompt[self._len:]
            self._len = len(prompt)
        if self._len < total:
            self._buf[self._len: total] = output[self._len - len(prompt):]
            self._len = total
        return self._buf[:total]
