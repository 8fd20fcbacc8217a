"""Reasoning parsers (<think>...</think>): whole answers, every streaming cut, and the reasoning
step in front of the tool-call parser."""
from __future__ import annotations

import pytest

from engine.entrypoints.openai.chat_output import AnswerParsers, AnswerStreamer, answer_parsers, parse_answer
from engine.entrypoints.openai.reasoning_parsers import (REASONING_PARSERS, get_reasoning_parser,
                                                         reasoning_tokens)
from engine.entrypoints.openai.tool_parsers import HermesParser
from engine.server_args import REASONING_PARSERS as FLAG_CHOICES

R1 = get_reasoning_parser("deepseek-r1")
QWEN3 = get_reasoning_parser("qwen3")
QWEN3_NO_THINKING = get_reasoning_parser("qwen3", {"enable_thinking": False})

# (parser, answer, reasoning, content)
CASES = [
    (QWEN3, "<think>\nLet me add.\n</think>\n\nIt is 4.", "Let me add.", "It is 4."),
    (R1, "<think>\nLet me add.\n</think>\n\nIt is 4.", "Let me add.", "It is 4."),
    # the R1 template's generation prompt ends in "<think>\n": the answer starts inside it
    (R1, "Let me add.\n</think>\n\nIt is 4.", "Let me add.", "It is 4."),
    (QWEN3, "Let me add.</think>It is 4.", "Let me add.", "It is 4."),      # Thinking-2507 templates
    (R1, "Still thinking about <b>4</b> and </thi", "Still thinking about <b>4</b> and </thi", ""),  # cut off
    (QWEN3, "<think>\n\n</think>\n\nIt is 4.", "", "It is 4."),            # an empty think block
    (QWEN3_NO_THINKING, "It is 4.", "", "It is 4."),                       # thinking off: all content
    (QWEN3_NO_THINKING, "It is <think>4</think>.", "", "It is <think>4</think>."),
    (QWEN3_NO_THINKING, "<think>odd</think>It is 4.", "odd", "It is 4."),   # an opening tag still counts
    (QWEN3_NO_THINKING, "  ", "", "  "),
    (R1, "<think>a</think>b</think>c", "a", "b</think>c"),                  # only the first end tag
]


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_whole_answer_splits_into_reasoning_and_content(parser, text, reasoning, content):
    split = parser.split(text, final=True)
    assert (split.reasoning, split.content) == (reasoning, content)


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_streamed_at_every_cut_adds_up_to_the_whole_and_never_shows_a_tag(parser, text, reasoning, content):
    for cut in range(len(text) + 1):
        streamer = AnswerStreamer(AnswerParsers(reasoning=parser))
        parts = [streamer.update(text[:cut]), streamer.update(text, final=True)]
        got_reasoning = "".join(p[0] for p in parts)
        got_content = "".join(p[1] for p in parts)
        assert (got_reasoning, got_content) == (reasoning, content), cut
        # the first part is a prefix of the final fields: no piece of a tag was sent and taken back
        assert reasoning.startswith(parts[0][0]) and content.startswith(parts[0][1]), cut


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_one_character_at_a_time_never_sends_part_of_a_tag(parser, text, reasoning, content):
    streamer = AnswerStreamer(AnswerParsers(reasoning=parser))
    got_reasoning = got_content = ""
    for k in range(1, len(text) + 1):
        r, c, _ = streamer.update(text[:k], final=k == len(text))
        got_reasoning, got_content = got_reasoning + r, got_content + c
        # what was sent so far is always a prefix of the final fields: nothing is taken back
        assert reasoning.startswith(got_reasoning) and content.startswith(got_content), (k, r, c)
    assert (got_reasoning, got_content) == (reasoning, content)


def test_a_partial_end_tag_is_held_back_until_it_resolves():
    streamer = AnswerStreamer(AnswerParsers(reasoning=R1))
    assert streamer.update("Hmm </thi")[:2] == ("Hmm", "")
    assert streamer.update("Hmm </think>\n")[:2] == ("", "")
    assert streamer.update("Hmm </think>\nYes")[:2] == ("", "Yes")
    assert QWEN3_NO_THINKING.split("<thi", final=False).content == ""      # may still open a block
    assert QWEN3_NO_THINKING.split("<thi", final=True).content == "<thi"


def test_tool_calls_are_read_only_after_the_reasoning():
    parsers = AnswerParsers(QWEN3, HermesParser())
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    ans = parse_answer(parsers, f"<think>\nMaybe {call}? No.\n</think>\n\nHere.")
    assert ans.tool_calls == [] and ans.content == "Here." and call in ans.reasoning
    text = f"<think>\nI should call f.\n</think>\n\n{call}"
    ans = parse_answer(parsers, text)
    assert ans.reasoning == "I should call f." and ans.content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in ans.tool_calls] == [("f", '{"x": 1}')]
    for cut in range(len(text) + 1):
        streamer = AnswerStreamer(parsers)
        parts = [streamer.update(text[:cut]), streamer.update(text, final=True)]
        assert "".join(p[0] for p in parts) == "I should call f." and "".join(p[1] for p in parts) == ""
        assert streamer.has_calls, cut


def test_answer_is_all_content_without_parser_when_constrained_or_not_separated():
    assert answer_parsers("qwen3", True, None, None, constrained=False).reasoning is not None
    assert answer_parsers("qwen3", False, None, None, constrained=False).reasoning is None
    assert answer_parsers("deepseek-r1", True, None, None, constrained=True).reasoning is None
    assert answer_parsers(None, True, None, None, constrained=False).reasoning is None
    assert parse_answer(AnswerParsers(), "<think>a</think>b").content == "<think>a</think>b"


def test_reasoning_tokens_count_the_tokens_before_the_end_tag():
    end = 99
    assert reasoning_tokens([5, 6, 7, end, 8], end, R1.split("abc</think>d", True).in_reasoning) == 3
    assert reasoning_tokens([5, 6, 7], end, R1.split("abc", True).in_reasoning) == 3               # never closed
    assert reasoning_tokens([5, 6], end, QWEN3_NO_THINKING.split("ab", True).in_reasoning) == 0   # no reasoning


def test_flag_choices_are_the_parsers():
    assert sorted(FLAG_CHOICES) == sorted(REASONING_PARSERS)
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'"):
        get_reasoning_parser("r2")
