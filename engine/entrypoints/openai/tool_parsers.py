"""Tool calls in a model's output text, per model family, whole or while it streams.

A parser reads the text generated so far and returns the plain content and the calls it
holds, where the last call may still be incomplete; ``ToolCallStreamer`` turns successive
parses into OpenAI's deltas, so that streamed and whole answers agree. Each parser also says
how its calls are written, so that ``tool_choice`` "required" or a named function can be
forced with a grammar (``TaggedSchema`` per function, see engine.constrained).

Formats: ``llama3`` a bare JSON object {"name": ..., "parameters": {...}} (several separated by
newlines or ";"); ``qwen25`` / ``hermes`` <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>;
``mistral`` [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] after any content, and
``mistral_v11`` [TOOL_CALLS]name[ARGS]{...} per call (both read either; they force different ones).
The arguments returned are the model's own JSON text of the arguments object.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Collection, Optional

from engine.constrained.base import TaggedSchema
from engine.entrypoints.openai.tool_call_scan import (WS, Invalid, PartialCall, loads_whole, scan_call, skip_ws,
                                                      value_end)

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ParseResult:
    content: str                                          # text that is not a call (unstripped)
    calls: list[PartialCall] = field(default_factory=list)


class ToolCallParser:
    """One model family's format. parse(text, final): final=False may hold back text that
    could still turn into a call; final=True decides everything."""

    name = ""
    separator = "\n"
    # the format's marker is a special token, which the answer's text must keep for the parser
    keeps_special_tokens = False

    def parse(self, text: str, final: bool) -> ParseResult:
        raise NotImplementedError

    def call_begin(self, function_name: str) -> str:
        raise NotImplementedError

    call_end = ""

    def tagged_schemas(self, functions: list[dict[str, Any]]) -> list[TaggedSchema]:
        """What a call of each function looks like, for the grammar that forces one."""
        return [TaggedSchema(self.call_begin(f["name"]), f.get("parameters") or _EMPTY_PARAMETERS,
                             self.call_end) for f in functions]


class HermesParser(ToolCallParser):
    """Qwen 2.5 / Hermes: calls inside <tool_call></tool_call>, text around them is content."""

    name = "qwen25"
    open_tag, close_tag = "<tool_call>", "</tool_call>"
    call_end = "}\n</tool_call>"

    def call_begin(self, function_name: str) -> str:
        return f'{self.open_tag}\n{{"name": {json.dumps(function_name)}, "arguments": '

    def parse(self, text: str, final: bool) -> ParseResult:
        res = ParseResult(content="")
        pos = 0
        while True:
            start = _content_until(res, text, pos, self.open_tag, final)
            if start < 0:
                return res
            try:
                call = scan_call(text, start + len(self.open_tag), ("arguments", "parameters"))
            except Invalid:
                if final:
                    res.content += text[start:]
                return res
            if call.end is None:
                if final:       # cut off inside the call: it is not a call
                    res.content += text[start:]
                else:
                    res.calls.append(call)
                return res
            res.calls.append(call)
            close = skip_ws(text, call.end)
            if text.startswith(self.close_tag, close):
                pos = close + len(self.close_tag)
            elif final or not self.close_tag.startswith(text[close:]):
                pos = call.end          # no closing tag: accept the call anyway
            else:
                return res              # the closing tag is still arriving


class Llama3Parser(ToolCallParser):
    """Llama 3.1/3.2 JSON tool calls: the whole answer is the call(s), else it is content."""

    name = "llama3"
    python_tag = "<|python_tag|>"
    call_end = "}"
    _START = re.compile(r'\{\s*"name"')

    def call_begin(self, function_name: str) -> str:
        return f'{{"name": {json.dumps(function_name)}, "parameters": '

    def parse(self, text: str, final: bool) -> ParseResult:
        i = skip_ws(text, 0)
        if text.startswith(self.python_tag, i):
            i = skip_ws(text, i + len(self.python_tag))
        if not self._START.match(text, i):
            if not final and _could_start_call(text[i:]):
                return ParseResult(content="")      # undecided: hold everything
            return ParseResult(content=text)
        calls: list[PartialCall] = []
        try:
            while True:
                call = scan_call(text, i, ("parameters", "arguments"))
                calls.append(call)
                if call.end is None:
                    if final:
                        raise Invalid("cut off inside a call")
                    return ParseResult(content="", calls=calls)
                i = skip_ws(text, call.end, ";")
                if i == len(text) or text[i] != "{":
                    return ParseResult(content=text[i:], calls=calls)
        except Invalid:
            return ParseResult(content=text) if final else ParseResult(content="", calls=calls)


class MistralParser(ToolCallParser):
    """Mistral with tool use, whose answers write calls after any content in one of two ways,
    both read here:
      v3 tokenizer (Mistral-7B-v0.3, Nemo): [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
      v11+ (Small 3.1/3.2, Devstral, Magistral): [TOOL_CALLS]name[ARGS]{...} for each call, some
          templates with [CALL_ID]id before [ARGS] (dropped: answers get our own call ids).
    The markers are special tokens, so answers keep special tokens while this parser reads them.
    Forced calls are written in the v3 form, one list each, back to back (MistralV11Parser
    writes the v11 form)."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    args_tag, call_id_tag = "[ARGS]", "[CALL_ID]"
    separator = ""
    call_end = "}]"
    keeps_special_tokens = True
    _NAME = re.compile(r'[^\s\[\]{}"]+')
    _CALL_ID = re.compile(r"[A-Za-z0-9_-]*")

    def call_begin(self, function_name: str) -> str:
        return f'{self.marker} [{{"name": {json.dumps(function_name)}, "arguments": '

    def parse(self, text: str, final: bool) -> ParseResult:
        res = ParseResult(content="")
        pos = 0
        while True:
            start = _content_until(res, text, pos, self.marker, final)
            if start < 0:
                return res
            before = len(res.calls)
            i = skip_ws(text, start + len(self.marker))
            scan = self._scan_list if text.startswith("[", i) else self._scan_named
            pos = scan(text, i, res, final)
            if pos is None:             # not a call, or cut off inside it
                if final:
                    del res.calls[before:]
                    res.content += text[start:]
                return res

    @staticmethod
    def _scan_list(text: str, i: int, res: ParseResult, final: bool) -> Optional[int]:
        """Append the calls of the list at text[i] to res; the index after it, or None when the
        text is not (or not yet) a whole list. A final answer may leave the list unclosed."""
        i += 1
        while True:
            try:
                call = scan_call(text, i, ("arguments", "parameters"))
            except Invalid:
                return None
            if call.end is None:
                if not final:
                    res.calls.append(call)
                return None
            res.calls.append(call)
            i = skip_ws(text, call.end)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            if i < len(text) and text[i] == "]":
                return i + 1
            return i if final else None     # unclosed at the end of a final answer: the calls stand

    def _scan_named(self, text: str, i: int, res: ParseResult, final: bool) -> Optional[int]:
        """Append the v11 call name([CALL_ID]id)?[ARGS]{...} at text[i] to res; the index after
        its arguments object, or None when the text is not (or not yet) such a call."""
        m = self._NAME.match(text, i)
        if m is None:
            return None
        j = skip_ws(text, m.end())
        if text.startswith(self.call_id_tag, j):
            j = skip_ws(text, self._CALL_ID.match(text, j + len(self.call_id_tag)).end())
        elif not text.startswith(self.args_tag, j):
            return None         # not a call, or its name or first tag is still arriving
        call = PartialCall(name=m.group())
        if not text.startswith(self.args_tag, j):
            if not final and self.args_tag.startswith(text[j:]):
                res.calls.append(call)      # after [CALL_ID]: the name is known
            return None
        j = skip_ws(text, j + len(self.args_tag))
        end = value_end(text, j) if text.startswith("{", j) else None
        if end is None:
            if not final and (j == len(text) or text[j] == "{"):
                call.args = text[j:]
                res.calls.append(call)
            return None
        try:
            loads_whole(text[j:end])
        except Invalid:
            return None
        call.args, call.args_done, call.end = text[j:end], True, end
        res.calls.append(call)
        return end


class MistralV11Parser(MistralParser):
    """Mistral v11+ tokenizers: reads both forms like MistralParser, and forces calls the way
    these models write them, [TOOL_CALLS]name[ARGS]{...} each, back to back. No [CALL_ID]: the
    templates that render one take it from the request's history, and the model's own output
    does not need it (the answer's call ids are ours)."""

    name = "mistral_v11"
    call_end = ""

    def call_begin(self, function_name: str) -> str:
        return f"{self.marker}{function_name}{self.args_tag}"


def _content_until(res: ParseResult, text: str, pos: int, tag: str, final: bool) -> int:
    """Add text[pos:] up to the next ``tag`` to res.content (while streaming, not an end of it
    that may still grow into the tag); the tag's index, or -1 when there is none."""
    start = text.find(tag, pos)
    if start < 0:
        rest = text[pos:]
        res.content += rest if final else rest[: len(rest) - partial_suffix(rest, tag)]
        return -1
    res.content += text[pos:start]
    return start


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _could_start_call(rest: str) -> bool:
    """rest (after blanks) may still grow into '{"name"'."""
    if not rest:
        return True
    compact = rest[0] + rest[1:].lstrip(WS) if rest[0] == "{" else rest
    return '{"name"'.startswith(compact)


PARSERS: dict[str, type[ToolCallParser]] = {"llama3": Llama3Parser, "qwen25": HermesParser,
                                            "hermes": HermesParser, "mistral": MistralParser,
                                            "mistral_v11": MistralV11Parser}


def get_parser(name: str) -> ToolCallParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}") from None


def detect_parser(model_type: Optional[str], chat_template: Optional[str],
                  tokens: Collection[str] = ()) -> Optional[str]:
    """The parser for a model when --tool-call-parser is not given: from the chat template's
    call format, else from the architecture. ``tokens``: the tokenizer's added tokens."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "qwen25"
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return "llama3"
    if "[TOOL_CALLS]" in template or model_type == "mistral":
        # The tokenizer decides over the template: a v11 model writes [ARGS] even where its
        # template renders history in the older list (the Mistral-Small-3.1 one llama.cpp keeps does).
        v11 = MistralParser.args_tag in template or MistralParser.args_tag in tokens
        return "mistral_v11" if v11 else "mistral"
    if model_type == "llama":
        return "llama3"
    if model_type in ("qwen2", "qwen3"):
        return "qwen25"
    return None


# ---- results in OpenAI's shape ---------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def complete_calls(result: ParseResult) -> list[PartialCall]:
    """The calls of a final parse whose arguments are whole JSON."""
    out = []
    for c in result.calls:
        try:
            c.final_args()
        except ValueError:
            continue
        if c.name is not None and c.end is not None:
            out.append(c)
    return out


def _content(res_content: str, final: bool, has_calls: bool) -> str:
    """The content to show: blanks that may precede or follow a call are held back (sent
    only if no call comes); once the answer has calls, it ends without them."""
    if final and not has_calls:
        return res_content
    return res_content.rstrip() if res_content.strip() else ""


def extract_tool_calls(parser: ToolCallParser, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of a finished answer: the text unchanged when it holds no
    call; else the text around the calls (None if blank)."""
    res = parser.parse(text, final=True)
    calls = complete_calls(res)
    if not calls:
        return text, []
    tool_calls = [{"id": new_call_id(), "type": "function",
                   "function": {"name": c.name, "arguments": c.final_args()}} for c in calls]
    return (_content(res.content, True, True) or None), tool_calls


class ToolCallStreamer:
    """Deltas of one streamed choice: feed the cumulative text, get what is new since the
    last call as (content delta, delta.tool_calls entries)."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_args: list[int] = []

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        res = self.parser.parse(text, final)
        has_calls = bool(self.ids) or bool(complete_calls(res) if final else [c for c in res.calls if c.name])
        content = _content(res.content, final, has_calls)
        content_delta = content[self.sent_content:] if len(content) > self.sent_content else ""
        self.sent_content = max(self.sent_content, len(content))
        deltas: list[dict[str, Any]] = []
        for k, call in enumerate(res.calls):
            if call.name is None:
                break
            try:
                args = call.stream_args()
            except ValueError:
                break
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(len(args))
                deltas.append({"index": k, "id": self.ids[k], "type": "function",
                               "function": {"name": call.name, "arguments": args}})
            elif len(args) > self.sent_args[k]:
                deltas.append({"index": k, "function": {"arguments": args[self.sent_args[k]:]}})
                self.sent_args[k] = len(args)
        return content_delta, deltas
