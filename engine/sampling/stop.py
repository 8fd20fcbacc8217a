"""Stop strings: on the streamed text in the front end, and on the last tokens in the scheduler.

Front end: ``StopStringMatcher`` turns the text so far into the part safe to send: never a stop
string, never a trailing prefix of one that may still complete. Scheduler:
``find_stop_in_tail`` decodes only the last ``stop_tail_tokens(...)`` tokens to end a request
as soon as a stop string appears.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from engine.sampling.detokenizer import decodable_vocab_size


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[tuple[int, str]]:
    """(position, stop) of the stop string that starts first in text[start:] (the shortest one
    when several start there), or None."""
    best: Optional[tuple[int, str]] = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos >= 0 and (best is None or (pos, len(stop)) < (best[0], len(best[1]))):
            best = (pos, stop)
    return best


class StopStringMatcher:
    """One per request. ``process`` expects the same text growing from call to call."""

    def __init__(self, stops: Sequence[str], *, no_stop_trim: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.no_stop_trim = no_stop_trim
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._scanned = 0                                   # no stop starts before this index
        self._match: Optional[tuple[int, str]] = None

    @property
    def matched(self) -> Optional[str]:
        return self._match[1] if self._match else None

    def process(self, text_so_far: str) -> tuple[str, Optional[str]]:
        """(safe_text, matched stop or None). After a match the request should end; the safe
        text then stops at the stop string (or after it with no_stop_trim)."""
        if not self.stops:
            return text_so_far, None
        if self._match is None:
            self._match = first_stop(text_so_far, self.stops, self._scanned)
        if self._match is not None:
            return self._cut(text_so_far), self._match[1]
        # a stop string not found yet can only start in the last max_len - 1 characters
        self._scanned = max(0, len(text_so_far) - self._max_len + 1)
        held = self._partial_stop_suffix(text_so_far)
        return text_so_far[:len(text_so_far) - held], None

    def finalize(self, text: str) -> str:
        """The final text of a finished request: cut at the first stop string (kept with
        no_stop_trim); a held-back partial stop string is released."""
        match = first_stop(text, self.stops)
        if match is None:
            return text
        pos, stop = match
        return text[:pos + len(stop)] if self.no_stop_trim else text[:pos]

    def _cut(self, text: str) -> str:
        pos, stop = self._match
        return text[:pos + len(stop)] if self.no_stop_trim else text[:pos]

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stops):
                return k
        return 0


def stop_tail_tokens(tokenizer: Any, stops: Sequence[str]) -> int:
    """How many trailing tokens to decode so that any stop string that just completed lies inside.

    Every token of a stop string carries at least one of its UTF-8 bytes, so it spans at most
    len(bytes) tokens; one more token in front keeps the decoder's view of the first token right
    (e.g. a SentencePiece leading space is dropped at the start of a decode). The tokenizer is
    not needed for this bound; it is taken so that a tokenizer-specific bound can replace it.
    """
    del tokenizer
    if not stops:
        return 0
    return max(len(s.encode("utf-8")) for s in stops) + 1


def find_stop_in_tail(tokenizer: Any, output_ids: Sequence[int], stops: Sequence[str],
                      tail_tokens: int, *, skip_special_tokens: bool = True) -> Optional[str]:
    """The stop string found in the text of the last ``tail_tokens`` output ids, or None."""
    if not stops or tail_tokens <= 0 or not output_ids:
        return None
    limit = decodable_vocab_size(tokenizer)
    tail = [i for i in output_ids[-tail_tokens:] if 0 <= i < limit]
    text = tokenizer.decode(tail, skip_special_tokens=skip_special_tokens) if tail else ""
    match = first_stop(text, stops)
    return match[1] if match else None
