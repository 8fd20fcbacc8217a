"""A chat answer's text as OpenAI's message fields, whole or streamed: the reasoning is split off
first, then tool calls are read from the content after it (a call written inside the reasoning
is not a call), so that streamed deltas add up to the whole answer's fields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from engine.entrypoints.openai import serving_common as common
from engine.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser, reasoning_tokens
from engine.entrypoints.openai.tool_parsers import ToolCallParser, ToolCallStreamer, extract_tool_calls


@dataclass
class AnswerParsers:
    reasoning: Optional[ReasoningParser] = None     # None: no reasoning_content
    tools: Optional[ToolCallParser] = None          # None: no tool_calls


def answer_parsers(reasoning_parser: Optional[str], separate_reasoning: bool,
                   template_kwargs: Optional[dict[str, Any]], tools: Optional[ToolCallParser],
                   constrained: bool) -> AnswerParsers:
    """The parsers of one request. A grammar (response_format, json_schema / regex / ebnf, a forced
    tool call) constrains the answer from its first token, so the model cannot write a reasoning
    block before it: such an answer is all content and its reasoning_content is absent (splitting
    it would file the whole constrained answer as reasoning for the parsers that start inside it)."""
    if reasoning_parser is None or not separate_reasoning or constrained:
        return AnswerParsers(tools=tools)
    return AnswerParsers(get_reasoning_parser(reasoning_parser, template_kwargs), tools)


@dataclass
class ParsedAnswer:
    reasoning: Optional[str]
    content: Optional[str]
    tool_calls: list[dict[str, Any]]
    in_reasoning: bool = False      # the answer opened a reasoning block


def parse_answer(parsers: AnswerParsers, text: str) -> ParsedAnswer:
    """The message fields of a finished answer. Content is None when the reasoning took it all."""
    reasoning, in_reasoning = None, False
    if parsers.reasoning is not None:
        split = parsers.reasoning.split(text, final=True)
        reasoning, text, in_reasoning = split.reasoning or None, split.content, split.in_reasoning
    content, calls = extract_tool_calls(parsers.tools, text) if parsers.tools else (text, [])
    if parsers.reasoning is not None and not content:
        content = None
    return ParsedAnswer(reasoning, content, calls, in_reasoning)


def count_reasoning_tokens(parsers: AnswerParsers, end_token_id: Optional[int],
                           answers: Sequence[tuple[bool, Sequence[int]]]) -> Optional[int]:
    """Reasoning tokens of finished answers, (in_reasoning, output ids) each; None when they are
    not separated or the end tag is not one token."""
    if parsers.reasoning is None or end_token_id is None:
        return None
    return sum(reasoning_tokens(ids, end_token_id, opened) for opened, ids in answers)


class AnswerStreamer:
    """Deltas of one streamed choice: feed the cumulative text, get what is new since the last
    call as (reasoning delta, content delta, delta.tool_calls entries). With stream_reasoning
    false the reasoning is held back and comes as one delta when it ends (at the end tag, or at
    the end of an answer that never closed it)."""

    def __init__(self, parsers: AnswerParsers, stream_reasoning: bool = True) -> None:
        self.reasoning = parsers.reasoning
        self.stream_reasoning = stream_reasoning
        self.tools = ToolCallStreamer(parsers.tools) if parsers.tools else None
        self.sent_reasoning = 0
        self.sent_content = [""]
        self.in_reasoning = False

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and self.tools.has_calls

    def update(self, text: str, final: bool = False) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning_delta = ""
        if self.reasoning is not None:
            split = self.reasoning.split(text, final)
            if self.stream_reasoning or split.ended or final:
                reasoning_delta = split.reasoning[self.sent_reasoning:]
                self.sent_reasoning = max(self.sent_reasoning, len(split.reasoning))
            text, self.in_reasoning = split.content, split.in_reasoning
        if self.tools is not None:
            content_delta, calls = self.tools.update(text, final)
        else:
            content_delta, calls = common.new_text(self.sent_content, 0, text), []
        return reasoning_delta, content_delta, calls

    def held_reasoning(self, text: str) -> str:
        """The reasoning of the cumulative ``text`` that stream_reasoning false still holds back
        (sent before an abort's error, so that the option changes when reasoning is sent, never
        whether)."""
        if self.reasoning is None or self.stream_reasoning:
            return ""
        return self.reasoning.split(text, True).reasoning[self.sent_reasoning:]
