"""A forgiving scanner over possibly-truncated JSON, for the tool parsers: where a value ends
(None while the text may still grow), and the call object {"name": ..., <args key>: ...} as far
as it has been generated."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

WS = " \t\r\n"


class Invalid(Exception):
    """The text cannot be a tool call of this format."""


def skip_ws(text: str, i: int, extra: str = "") -> int:
    while i < len(text) and (text[i] in WS or text[i] in extra):
        i += 1
    return i


def string_end(text: str, i: int) -> Optional[int]:
    """text[i] is '"': index after the closing quote, None if the text ends first."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> Optional[int]:
    """Index after the JSON value starting at text[i]; None if the text ends first."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + WS:
        j += 1
    if j == len(text):
        return None          # a number or literal may still grow
    try:
        json.loads(text[i:j])
    except ValueError:
        raise Invalid(f"bad JSON literal {text[i:j]!r}") from None
    return j


def loads_whole(text: str) -> Any:
    """A whole JSON value that the scanner delimited; malformed inside means not a call."""
    try:
        return json.loads(text)
    except ValueError:
        raise Invalid(f"malformed JSON {text[:40]!r}") from None


@dataclass
class PartialCall:
    name: Optional[str] = None
    args: str = ""                 # JSON text of the arguments value, as far as generated
    args_done: bool = False
    end: Optional[int] = None      # index after the call object's "}" once complete

    def stream_args(self) -> str:
        """The arguments text safe to send now (a string-encoded value only when whole)."""
        if self.args.startswith('"'):
            return self.final_args() if self.args_done else ""
        if not self.args and self.end is not None:
            return "{}"
        return self.args

    def final_args(self) -> str:
        if not self.args:
            return "{}"
        value = json.loads(self.args)
        return value if isinstance(value, str) else self.args


def scan_call(text: str, i: int, args_keys: tuple[str, ...]) -> PartialCall:
    """The call object {"name": ..., <args key>: ...} starting at text[i] (after blanks), as
    far as the text goes. Raises Invalid if it cannot be one."""
    call = PartialCall()
    i = skip_ws(text, i)
    if i == len(text):
        return call
    if text[i] != "{":
        raise Invalid("a call starts with '{'")
    i += 1
    while True:
        i = skip_ws(text, i, ",")
        if i == len(text):
            return call
        if text[i] == "}":
            if call.name is None:
                raise Invalid("the call has no name")
            call.args_done = True
            call.end = i + 1
            return call
        if text[i] != '"':
            raise Invalid("expected a key")
        key_end = string_end(text, i)
        if key_end is None:
            return call
        key = loads_whole(text[i:key_end])
        i = skip_ws(text, key_end)
        if i == len(text):
            return call
        if text[i] != ":":
            raise Invalid("expected ':'")
        i = skip_ws(text, i + 1)
        if i == len(text):
            return call
        end = value_end(text, i)
        if key == "name":
            if end is None:
                return call
            name = loads_whole(text[i:end])
            if not isinstance(name, str):
                raise Invalid("the name must be a string")
            call.name = name
        elif key in args_keys:
            call.args = text[i:end] if end is not None else text[i:]
            call.args_done = end is not None
            if end is not None and not isinstance(loads_whole(call.args), (dict, str)):
                raise Invalid("the arguments must be an object")
        if end is None:
            return call
        i = end
