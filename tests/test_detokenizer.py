"""Incremental detokenization and stop strings, with the tiny checkpoint's byte-level BPE tokenizer."""
from __future__ import annotations

from typing import Optional

import pytest
from transformers import AutoTokenizer

from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling.stop import StopStringMatcher, find_stop_in_tail, stop_tail_tokens

TEXTS = [
    "Héllo wörld — naïve café, señor! Ça va? Straße.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 end 🎉",
    "mixed: déjà vu 日本語 text 😀 and ascii again; Ελληνικά, русский.",
]


@pytest.fixture(scope="module")
def tokenizer(llama_tiny):
    return AutoTokenizer.from_pretrained(llama_tiny)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids: list[int], step: int = 1, **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, **kw)
    deltas = [detok.append(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return detok, deltas


def test_tokenizer_splits_characters_across_tokens(tokenizer):
    """The test is only meaningful if some characters span several tokens."""
    pieces = [tokenizer.decode([i]) for t in TEXTS for i in encode(tokenizer, t)]
    assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("step", [1, 2, 5])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_concatenate_to_full_decode(tokenizer, text, step):
    ids = encode(tokenizer, text)
    detok, deltas = stream(tokenizer, ids, step)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    ids = encode(tokenizer, TEXTS[0]) + [eos] + encode(tokenizer, TEXTS[2]) + [eos]
    detok, deltas = stream(tokenizer, ids, skip_special_tokens=skip)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in detok.text) is not skip


def test_raw_tokenizers_tokenizer_is_accepted(tokenizer):
    raw = tokenizer.backend_tokenizer                  # a `tokenizers.Tokenizer`
    ids = encode(tokenizer, TEXTS[2]) + [raw.get_vocab_size() + 1]
    detok, deltas = stream(raw, ids, 3)
    assert detok.text == TEXTS[2] and not any("\ufffd" in d for d in deltas)


def test_ids_beyond_the_tokenizer_decode_to_nothing(tokenizer):
    padded = len(tokenizer) + 7          # checkpoint vocabularies are often padded past the tokenizer
    ids = encode(tokenizer, TEXTS[1])
    with_padding = ids[:3] + [padded, len(tokenizer)] + ids[3:] + [padded]
    detok, _ = stream(tokenizer, with_padding)
    assert detok.text == TEXTS[1]


def test_each_step_decodes_a_short_window(tokenizer):
    lengths = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def convert_ids_to_tokens(self, ids):
            return self.inner.convert_ids_to_tokens(ids)

        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return self.inner.decode(ids, **kw)

    ids = encode(tokenizer, " ".join(TEXTS * 3))
    detok, _ = stream(Recording(tokenizer), ids)
    assert detok.text == tokenizer.decode(ids)
    assert max(lengths) <= 12 < len(ids)


def test_invalid_utf8_tail_is_held_back_then_flushed(tokenizer):
    ids = encode(tokenizer, "ok 🙂")
    partial = ids[:-1]                   # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.append([i]) for i in partial)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tokenizer.decode(partial) == detok.text


# ------------------------------------------------------------------------------------------- stop strings

def front_end(tokenizer, ids: list[int], stops: list[str], no_stop_trim: bool = False,
              ) -> tuple[list[str], Optional[str], str]:
    """What a client sees: the streamed chunks, the stop that matched, the final text."""
    detok = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(stops, no_stop_trim=no_stop_trim)
    sent, chunks, matched = "", [], None
    for i in ids:
        detok.append([i])
        safe, matched = matcher.process(detok.text)
        assert safe.startswith(sent), "safe text must only grow"
        chunks.append(safe[len(sent):])
        sent = safe
        if matched:
            break
    detok.flush()
    final = matcher.finalize(detok.text)
    assert final.startswith(sent)
    chunks.append(final[len(sent):])
    return chunks, matched, final


@pytest.mark.parametrize("stop", ["天气", "wörld", "👍🏽", " va?", "e.", "Ελλη"])
def test_stop_string_never_returned(tokenizer, stop):
    text = next(t for t in TEXTS if stop in t)
    ids = encode(tokenizer, text)
    chunks, matched, final = front_end(tokenizer, ids, [stop, "never appears"])
    streamed = ""
    for chunk in chunks:
        streamed += chunk
        assert stop not in streamed
    assert matched == stop and streamed == final == text[:text.index(stop)]


def test_stop_string_split_across_tokens(tokenizer):
    text, stop = TEXTS[1], "天气很"
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)       # no single token holds it
    _, matched, final = front_end(tokenizer, ids, [stop])
    assert matched == stop and final == text[:text.index(stop)]


def test_prefix_of_a_stop_string_is_released_when_it_does_not_complete(tokenizer):
    text = TEXTS[0]                       # contains "café," but not "café au lait"
    chunks, matched, final = front_end(tokenizer, encode(tokenizer, text), ["café au lait", "Ça vaut"])
    assert matched is None and "".join(chunks) == final == text


def test_held_back_text_waits_for_the_stop_to_resolve():
    matcher = StopStringMatcher(["Hello world"])
    assert matcher.process("Say Hel") == ("Say ", None)
    assert matcher.process("Say Hello w") == ("Say ", None)
    assert matcher.process("Say Hello there") == ("Say Hello there", None)
    assert matcher.process("Say Hello there. Hello world!") == ("Say Hello there. ", "Hello world")


def test_no_stop_trim_keeps_the_stop_string(tokenizer):
    text = TEXTS[3]
    _, matched, final = front_end(tokenizer, encode(tokenizer, text), ["日本"], no_stop_trim=True)
    assert matched == "日本" and final == text[:text.index("日本") + 2]


def test_earliest_stop_wins():
    matcher = StopStringMatcher(["b", "xab"])
    assert matcher.finalize("..xab..") == ".."
    assert matcher.process("..xab..") == ("..", "xab")


# ---------------------------------------------------------------------------------- scheduler-side tail

@pytest.mark.parametrize("stop", ["天气很", " va?", "👨‍👩‍👧", "ascii", "Ελλη"])
def test_tail_detection_fires_at_the_first_token_that_completes_the_stop(tokenizer, stop):
    text = next(t for t in TEXTS if stop in t)
    ids = encode(tokenizer, text)
    tail = stop_tail_tokens(tokenizer, [stop, "zz"])
    fired = next(n for n in range(1, len(ids) + 1)
                 if find_stop_in_tail(tokenizer, ids[:n], [stop, "zz"], tail))
    completes = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
    assert fired == completes
    assert tail < len(ids)               # the check decodes a short tail, not the whole output


def test_tail_detection_ignores_ids_beyond_the_tokenizer(tokenizer):
    ids = encode(tokenizer, "so we stop here") + [len(tokenizer) + 3]
    tail = stop_tail_tokens(tokenizer, ["stop here"])
    assert find_stop_in_tail(tokenizer, ids, ["stop here"], tail) == "stop here"
    assert find_stop_in_tail(tokenizer, ids, [], 5) is None
