"""Incremental detokenization: new token ids in, newly final text out.

Each step decodes only a short window: the tokens since ``prefix_offset``. The text of the
window's first part (up to ``read_offset``) was already returned, so the new text is the
difference. Decoding a window instead of a single token keeps what depends on neighbours
right (a leading-space marker, a character split over several byte tokens); text whose last
character is still incomplete (decodes to U+FFFD) is held back until it completes.
"""
from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self._decode_kwargs: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
        if hasattr(tokenizer, "convert_ids_to_tokens"):   # a transformers tokenizer; raw
            # `tokenizers.Tokenizer.decode` takes no such keyword (fast tokenizers ignore it)
            self._decode_kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
        self._vocab_limit = decodable_vocab_size(tokenizer)
        self.ids: list[int] = []          # every in-vocabulary id so far
        self.prefix_offset = 0            # window start: text of ids[prefix_offset:read_offset] ...
        self.read_offset = 0              # ... has already been returned
        self._text = ""

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._text

    def append(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text that became final. Ids the tokenizer does not know
        (checkpoint vocabularies are often padded past the tokenizer's) decode to nothing."""
        self.ids.extend(i for i in new_ids if 0 <= i < self._vocab_limit)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: return what was held back, even if it ends in U+FFFD
        (the model really produced invalid UTF-8)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if len(self.ids) == self.read_offset:
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        if not final and (len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT)):
            return ""   # nothing new yet (special tokens skipped), or a character still incomplete
        delta = window_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self._decode_kwargs) if ids else ""


def decodable_vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can decode, added tokens included."""
    if hasattr(tokenizer, "get_vocab_size"):                  # tokenizers.Tokenizer
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)                                     # transformers tokenizers
