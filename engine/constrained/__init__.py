"""Constrained decoding: grammar backends (xgrammar), the scheduler's grammar manager, and the
packed-bitmask helpers."""
from engine.constrained.base import (CONSTRAINT_KINDS, GrammarBackend, GrammarError, GrammarKey,
                                     GrammarMatcher, TaggedSchema, backend_class, grammar_key)

__all__ = ["CONSTRAINT_KINDS", "GrammarBackend", "GrammarError", "GrammarKey", "GrammarMatcher",
           "TaggedSchema", "backend_class", "grammar_key"]
