"""The xgrammar implementation of the grammar-backend role.

JSON schemas compile in xgrammar's strict mode (properties not listed are not generated unless
``additionalProperties`` allows them) with compact separators (", " and ": ", no free
whitespace: a model cannot loop on blanks, and outputs are short).
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import torch

from engine.constrained.base import GrammarBackend, GrammarError, GrammarKey, GrammarMatcher, TaggedSchema
from engine.constrained.schema_prep import prepare_schema_text

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a Check
# failed clause); the user needs only the message.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"Check failed: \(.*?\) is false:\s*")
# Rows below which one thread fills the bitmask faster than xgrammar's thread pool (~10 us a row).
_PARALLEL_FILL_MIN = 64
# xgrammar 0.2.8 writes the characters of a string with minLength/maxLength as [^"\\\r\n],
# which lets raw control characters (invalid in JSON) through; its plain strings exclude them.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _clean(e: BaseException) -> str:
    msg = str(e).strip()
    msg = _LOG_PREFIX.sub("", msg)
    return _CHECK_PREFIX.sub("", msg).strip()


def json_schema_ebnf(schema_text: str) -> str:
    """EBNF of a (prepared) JSON schema: compact separators, strict properties, and only
    characters that JSON allows unescaped inside bounded strings."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema_text, any_whitespace=False, strict_mode=True))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _tokenizer_vocab_size(tokenizer: Any) -> int:
    """One past the largest token id the tokenizer can produce (added tokens included)."""
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else len(tokenizer)


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher      # xgrammar.GrammarMatcher

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, model_vocab_size: int, stop_token_ids: list[int],
                 max_threads: int = min(8, os.cpu_count() or 1)) -> None:
        """Cheap: xgrammar's tokenizer tables are built on the first compile (in the caller's
        thread, which is the compile pool's)."""
        self._tokenizer = tokenizer
        self._vocab_size = min(model_vocab_size, _tokenizer_vocab_size(tokenizer))
        self._stop_token_ids = sorted(stop_token_ids)
        self._max_threads = max_threads
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._batch: Any = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _ready(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                # Our caller caches compiled grammars by key; xgrammar's own cache would hold a
                # second copy.
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads,
                                                     cache_enabled=False)
                self._batch = xgr.BatchGrammarMatcher(max_threads=self._max_threads)
            return self._compiler

    # -- front end: syntax only -------------------------------------------------------------
    @classmethod
    def preload(cls) -> None:
        import xgrammar  # noqa: F401

    @classmethod
    def validate(cls, key: GrammarKey) -> None:
        import xgrammar as xgr

        text = cls._prepare(key)
        try:
            if key.kind == "json_schema":
                xgr.Grammar.from_ebnf(json_schema_ebnf(text))
            elif key.kind == "regex":
                xgr.Grammar.from_regex(key.text)
            elif key.kind == "ebnf":
                xgr.Grammar.from_ebnf(key.text)
            else:
                raise GrammarError(f"unknown constraint kind {key.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and its own types
            raise GrammarError(f"{key.kind} is invalid: {_clean(e)}") from None

    @staticmethod
    def _prepare(key: GrammarKey) -> str:
        if key.kind != "json_schema":
            return key.text
        try:
            return prepare_schema_text(key.text)
        except ValueError as e:
            raise GrammarError(str(e)) from None

    @classmethod
    def tagged_json_ebnf(cls, tags: list[TaggedSchema], separator: str, *, at_least_one: bool,
                         stop_after_first: bool) -> str:
        import xgrammar as xgr

        try:
            contents = []
            for t in tags:
                schema = cls._prepare(GrammarKey("json_schema", json.dumps(t.schema)))
                contents.append(json_schema_ebnf(schema))
            tag = {"type": "structural_tag", "format": {
                "type": "tags_with_separator", "separator": separator, "at_least_one": at_least_one,
                "stop_after_first": stop_after_first,
                "tags": [{"type": "tag", "begin": t.begin, "end": t.end,
                          "content": {"type": "grammar", "grammar": g}} for t, g in zip(tags, contents)]}}
            return str(xgr.Grammar.from_structural_tag(json.dumps(tag)))
        except GrammarError as e:
            raise GrammarError(f"tools: a function's parameters schema cannot be used ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"tools: a function's parameters schema is invalid ({_clean(e)})") from None

    # -- scheduler ---------------------------------------------------------------------------
    def compile(self, key: GrammarKey) -> Any:
        compiler = self._ready()
        text = self._prepare(key)
        try:
            if key.kind == "json_schema":
                return compiler.compile_grammar(json_schema_ebnf(text))
            if key.kind == "regex":
                return compiler.compile_regex(key.text)
            if key.kind == "ebnf":
                return compiler.compile_grammar(key.text)
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"{key.kind} is invalid: {_clean(e)}") from None
        raise GrammarError(f"unknown constraint kind {key.kind!r}")

    def new_matcher(self, compiled: Any) -> XGrammarMatcher:
        import xgrammar as xgr

        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        import xgrammar as xgr

        return xgr.allocate_token_bitmask(batch_size, self._vocab_size)   # [B, ceil(V / 32)] int32

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        self._ready()
        raw = [m.matcher for m in matchers]  # type: ignore[attr-defined]
        if len(raw) < _PARALLEL_FILL_MIN or self._max_threads < 2:
            for m, row in zip(raw, rows):
                m.fill_next_token_bitmask(bitmask, row)
        else:
            self._batch.batch_fill_next_token_bitmask(raw, bitmask, indices=rows)

