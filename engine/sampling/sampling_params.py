"""SamplingParams: SGLang's sampling keys, validated in one place.

Every front end (offline Engine, native /generate, OpenAI, gRPC) turns its request into a
dict of these keys and calls ``SamplingParams.from_dict``; a bad value raises ValueError
naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_MAX_TOP_LOGPROBS = 20


def is_unicode_text(s: str) -> bool:
    """False for a str with a lone UTF-16 surrogate (JSON's "\\ud800" escape without its pair),
    which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 or 0: no top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    # SGLang spells the seed "sampling_seed"; OpenAI "seed".
    _ALIASES = {"sampling_seed": "seed", "max_tokens": "max_new_tokens"}

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "SamplingParams":
        d = dict(d or {})
        for alias, name in cls._ALIASES.items():
            if alias in d:
                value = d.pop(alias)
                if name not in d:
                    d[name] = value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {', '.join(unknown)}")
        params = cls(**d)
        params.validate()
        return params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name} {msg}")

        def num(name: str, kind: type, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                bad(name, f"must be {'a number' if kind is float else 'an integer'}, got {v!r}")
            setattr(self, name, kind(v))

        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"):
            num(name, float)
        for name in ("min_new_tokens", "top_k", "n"):
            num(name, int)
        num("max_new_tokens", int, allow_none=True)
        num("seed", int, allow_none=True)

        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            bad("max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.top_k == 0:
            self.top_k = -1
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.n < 1:
            bad("n", f"must be >= 1, got {self.n}")
        if self.n > 128:
            bad("n", f"must be <= 128, got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            bad("seed", "must fit in 64 bits")

        self.stop = _str_list("stop", self.stop)
        if any(s == "" for s in self.stop):
            bad("stop", "must not contain an empty string")
        if any(not is_unicode_text(s) for s in self.stop):
            bad("stop", "holds a lone UTF-16 surrogate, which is not Unicode text")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be a boolean, got {getattr(self, name)!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be an object mapping token ids to numbers")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                bad("logit_bias", "must map integer token ids to numbers")
            for k, v in self.logit_bias.items():
                if k < 0 or not -100.0 <= v <= 100.0:
                    bad("logit_bias", f"entries must be token id >= 0 -> value in [-100, 100], got {k}: {v}")
        grammars = [g for g in ("json_schema", "regex", "ebnf") if getattr(self, g) is not None]
        if len(grammars) > 1:
            bad(grammars[1], f"cannot be combined with {grammars[0]}: give at most one constraint")
        for g in grammars:
            if not isinstance(getattr(self, g), str):
                bad(g, "must be a string")
            if not is_unicode_text(getattr(self, g)):
                bad(g, "holds a lone UTF-16 surrogate, which is not Unicode text")

    def check_vocab(self, vocab_size: int) -> None:
        """Checks that need the model: token ids within the vocabulary."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids: token id {t} is outside the vocabulary (size {vocab_size})")
        for t in (self.logit_bias or {}):
            if t >= vocab_size:
                raise ValueError(f"logit_bias: token id {t} is outside the vocabulary (size {vocab_size})")


def _str_list(name: str, v: Union[None, str, list]) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
        return list(v)
    raise ValueError(f"{name} must be a string or a list of strings, got {v!r}")


MAX_TOP_LOGPROBS = _MAX_TOP_LOGPROBS
