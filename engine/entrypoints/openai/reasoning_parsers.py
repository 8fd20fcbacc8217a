"""Reasoning in a chat answer, <think>...</think>, split from the content whole or while it streams.

``ReasoningParser.split(text, final)`` reads the answer generated so far. While streaming
(final=False) it holds back what may still be part of a tag, so the reasoning and the content it
returns only ever grow as text arrives: deltas of successive splits add up to the whole answer's.

Semantics (the same whole and streamed):
  - the answer opens a reasoning block when it starts (after blanks) with <think>;
  - a parser that starts inside reasoning (``deepseek-r1``: the template's generation prompt ends
    in "<think>\\n", so many answers never write the opening tag; ``qwen3`` unless the request turns
    thinking off) reads the answer as reasoning from its first character, tag or not;
  - reasoning runs to the first </think>; an answer cut off before it is all reasoning;
  - otherwise (``qwen3`` with enable_thinking false: the prompt holds an empty think block) the
    answer is all content, unchanged;
  - blanks around the reasoning and before the content are dropped (the templates put newlines
    there); tags never appear in either part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from engine.entrypoints.openai.tool_parsers import partial_suffix


@dataclass
class ReasoningSplit:
    reasoning: str
    content: str
    in_reasoning: bool      # the answer opened a reasoning block (whether or not it closed it)
    ended: bool = False     # </think> was seen: the reasoning is complete


class ReasoningParser:
    """<think>...</think> reasoning. ``starts_in_reasoning``: the prompt left the block open."""

    name = ""
    start_tag, end_tag = "<think>", "</think>"

    def __init__(self, starts_in_reasoning: bool) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    def split(self, text: str, final: bool) -> ReasoningSplit:
        lead = text.lstrip()
        if lead.startswith(self.start_tag):
            body = lead[len(self.start_tag):]
        elif not final and self.start_tag.startswith(lead):
            return ReasoningSplit("", "", self.starts_in_reasoning)     # "<thi" may become the tag
        elif self.starts_in_reasoning:
            body = text
        else:
            return ReasoningSplit("", text, False)
        end = body.find(self.end_tag)
        if end >= 0:
            return ReasoningSplit(body[:end].strip(), body[end + len(self.end_tag):].lstrip(), True, True)
        if not final:
            body = body[: len(body) - partial_suffix(body, self.end_tag)]
        return ReasoningSplit(body.strip(), "", True)


class DeepSeekR1Parser(ReasoningParser):
    """DeepSeek-R1 and its distills: always reason first; the opening tag is in the prompt."""

    name = "deepseek-r1"

    def __init__(self, template_kwargs: dict[str, Any]) -> None:
        super().__init__(starts_in_reasoning=True)


class Qwen3Parser(ReasoningParser):
    """Qwen3: reasons unless the chat template's enable_thinking is false, which prefills an
    empty think block (Qwen3-*-Thinking-2507 templates put <think> in the prompt: read the same)."""

    name = "qwen3"

    def __init__(self, template_kwargs: dict[str, Any]) -> None:
        super().__init__(starts_in_reasoning=bool(template_kwargs.get("enable_thinking", True)))


REASONING_PARSERS: dict[str, type] = {"deepseek-r1": DeepSeekR1Parser, "qwen3": Qwen3Parser}


def reasoning_tokens(output_ids: Sequence[int], end_token_id: int, in_reasoning: bool) -> int:
    """Tokens of a finished answer before its end tag (all of them when it never closed its
    reasoning; none when it had no reasoning block: ``in_reasoning`` false)."""
    if not in_reasoning:
        return 0
    ids = list(output_ids)
    return ids.index(end_token_id) if end_token_id in ids else len(ids)


def get_reasoning_parser(name: str, template_kwargs: Optional[dict[str, Any]] = None) -> ReasoningParser:
    """The parser for one request: the template's arguments may say whether it reasons."""
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}") from None
    return cls(template_kwargs or {})
