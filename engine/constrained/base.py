"""The grammar-backend role: compile a constraint (JSON schema, regex, EBNF) once, then give
each constrained request a matcher that fills a packed token bitmask and accepts tokens.

Bitmask layout (shared by xgrammar and llguidance): int32 [B, ceil(V / 32)], bit j of word w
set = token 32 * w + j allowed. ``backend_class`` maps --grammar-backend to an implementation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.sampling.sampling_params import SamplingParams

CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf")


class GrammarError(ValueError):
    """The constraint cannot be compiled (bad syntax, or a feature the backend lacks)."""


@dataclass(frozen=True)
class GrammarKey:
    """What to compile; also the cache key."""
    kind: str    # one of CONSTRAINT_KINDS
    text: str


def grammar_key(params: SamplingParams) -> Optional[GrammarKey]:
    """The request's constraint, or None (SamplingParams allows at most one)."""
    for kind in CONSTRAINT_KINDS:
        text = getattr(params, kind)
        if text is not None:
            return GrammarKey(kind, text)
    return None


@dataclass(frozen=True)
class TaggedSchema:
    """One alternative of a tagged-JSON grammar: ``begin`` JSON(schema) ``end``; tool calls
    are lists of these (one per function) joined by a separator."""
    begin: str
    schema: dict[str, Any]
    end: str


class GrammarMatcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (state unchanged)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """A stop token ended the document: nothing more may follow."""


class GrammarBackend(ABC):
    """Compiles constraints against one tokenizer and fills bitmasks for batches of matchers."""

    name: str = ""

    @classmethod
    def preload(cls) -> None:
        """Import the backend's library (slow the first time); call from a side thread."""

    @classmethod
    @abstractmethod
    def validate(cls, key: GrammarKey) -> None:
        """Cheap, tokenizer-free syntax check for the front end; raises GrammarError."""

    @classmethod
    @abstractmethod
    def tagged_json_ebnf(cls, tags: list[TaggedSchema], separator: str, *, at_least_one: bool,
                         stop_after_first: bool) -> str:
        """EBNF text (for SamplingParams.ebnf) of one or more tagged JSON documents."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Tokens the bitmask covers (the tokenizer's; the model's may be larger)."""

    @abstractmethod
    def compile(self, key: GrammarKey) -> Any:
        """The compiled grammar (thread-safe; called off the scheduling loop). Raises GrammarError."""

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        ...

    @abstractmethod
    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """[batch_size, ceil(vocab_size / 32)] int32 on the CPU."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Write matchers[i]'s allowed tokens into bitmask row rows[i]."""


def backend_class(name: str) -> type[GrammarBackend]:
    """The backend class registered as ``name`` (imported on first use)."""
    if name == "xgrammar":
        try:
            import xgrammar  # noqa: F401
        except ImportError as e:
            raise RuntimeError("--grammar-backend xgrammar: the xgrammar package is not installed "
                               f"({e}); pip install xgrammar, or pass --grammar-backend none") from e
        from engine.constrained.xgrammar_backend import XGrammarBackend

        return XGrammarBackend
    raise ValueError(f"unknown grammar backend {name!r}; use xgrammar or none")
