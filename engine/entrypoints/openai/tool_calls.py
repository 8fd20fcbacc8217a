"""What `tools` and `tool_choice` mean for one chat request: the tools the chat template
offers, the parser that reads calls back, and the grammar that forces a call.

  none      tools are not offered, nothing is parsed;
  auto      tools are offered, the answer is parsed for calls (default when tools are given);
  required  / {"type": "function", "function": {"name": f}}: generation is constrained to one
            or more calls (one, for a named function or parallel_tool_calls false) in the
            parser's format, each call's arguments by the function's parameter schema.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Collection, Optional

from engine.constrained.base import TaggedSchema, backend_class
from engine.entrypoints.openai.tool_parsers import PARSERS, ToolCallParser, detect_parser, get_parser

logger = logging.getLogger(__name__)


@dataclass
class ToolPlan:
    template_tools: Optional[list[dict[str, Any]]] = None   # passed to the chat template
    parser: Optional[ToolCallParser] = None                  # None: the answer is plain content
    ebnf: Optional[str] = None                               # forces a call when set


def resolve_parser_name(configured: Optional[str], model_path: Optional[str], tokenizer: Any) -> Optional[str]:
    """--tool-call-parser, else the one the chat template, the tokenizer or the architecture implies."""
    if configured and not configured.startswith("mistral"):
        return configured
    model_type = None
    config = os.path.join(model_path or "", "config.json")
    if os.path.isfile(config):
        try:
            with open(config) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError):
            pass
    name = detect_parser(model_type, getattr(tokenizer, "chat_template", None), _added_tokens(tokenizer))
    if configured:
        if name is not None and name.startswith("mistral") and name != configured:
            logger.warning("--tool-call-parser %s, but this model's tokenizer and template write calls as %s: "
                           "forced calls (tool_choice required or named) may not be in the form it knows",
                           configured, name)
        return configured
    logger.info("tool-call parser: %s (from the chat template / tokenizer / model type %s)", name or "none",
                model_type)
    return name


def _added_tokens(tokenizer: Any) -> Collection[str]:
    """The tokenizer's added (mostly special) tokens: Mistral's v11 [ARGS] is one."""
    try:
        return tokenizer.get_added_vocab().keys()
    except (AttributeError, TypeError):
        return ()


def plan_tools(tools: Optional[list[dict[str, Any]]], tool_choice: Any, parallel: bool,
               parser_name: Optional[str], grammar_backend: str) -> ToolPlan:
    """Raises ValueError (a 400) for a choice that cannot be honoured."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not tools:
        if choice == "required" or named:
            raise ValueError("tool_choice asks for a tool call, but the request has no tools")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    parser = get_parser(parser_name) if parser_name else None
    if choice == "auto":
        return ToolPlan(tools, parser)
    what = f"tool_choice {json.dumps(choice)}"
    if parser is None:
        raise ValueError(f"{what} needs to know the model's tool-call format; start the server with "
                         f"--tool-call-parser ({', '.join(PARSERS)})")
    if grammar_backend == "none":
        raise ValueError(f"{what} needs constrained decoding, but the server was started with "
                         "--grammar-backend none")
    functions = [t["function"] for t in tools]
    if named is not None:
        functions = [f for f in functions if f["name"] == named]
        if not functions:
            raise ValueError(f"tool_choice names the function {named!r}, which is not in tools")
    tagged = parser.tagged_schemas(functions)
    spec = json.dumps({"tags": [[t.begin, t.schema, t.end] for t in tagged], "sep": parser.separator,
                       "single": named is not None or not parallel})
    return ToolPlan(tools, parser, _tool_grammar(grammar_backend, spec))


@functools.lru_cache(maxsize=256)
def _tool_grammar(backend: str, spec: str) -> str:
    d = json.loads(spec)
    tags = [TaggedSchema(begin, schema, end) for begin, schema, end in d["tags"]]
    return backend_class(backend).tagged_json_ebnf(tags, d["sep"], at_least_one=True,
                                                   stop_after_first=d["single"])
