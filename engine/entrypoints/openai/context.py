"""What every HTTP handler needs: the TokenizerManager, the server args, the model names
that requests may use, and the request ids in flight (for abort_all)."""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.entrypoints.openai.errors import APIError


def anyserve_version() -> str:
    try:
        from importlib.metadata import version
        return version("anyserve")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. a source tree)
        return "0.0.0+unknown"


@dataclass
class ApiContext:
    tm: Any                                   # TokenizerManager (or the test fake)
    server_args: Any                          # engine.server_args.ServerArgs
    inflight: set[str] = field(default_factory=set)   # rids of generations started over HTTP
    created: int = field(default_factory=lambda: int(time.time()))
    _token_ids: dict[str, Optional[int]] = field(default_factory=dict, repr=False)

    @property
    def served_model_name(self) -> str:
        return self.tm.served_model_name

    @property
    def model_names(self) -> set[str]:
        """Names a request may give in `model`: the served name and the model path."""
        names = {self.tm.served_model_name, self.tm.model_path,
                 getattr(self.server_args, "model_path", None)}
        return {n for n in names if n}

    @property
    def grammar_enabled(self) -> bool:
        return getattr(self.server_args, "grammar_backend", "none") != "none"

    @functools.cached_property
    def tool_parser_name(self) -> Optional[str]:
        """The tool-call format of the served model (None: tool calls are not parsed)."""
        from engine.entrypoints.openai.tool_calls import resolve_parser_name

        return resolve_parser_name(getattr(self.server_args, "tool_call_parser", None),
                                   getattr(self.server_args, "model_path", None),
                                   getattr(self.tm, "tokenizer", None))

    @property
    def reasoning_parser_name(self) -> Optional[str]:
        """--reasoning-parser (None: answers are not split into reasoning and content)."""
        return getattr(self.server_args, "reasoning_parser", None)

    def single_token_id(self, text: str) -> Optional[int]:
        """The id of ``text`` when the tokenizer writes it as one token (a reasoning end tag),
        else None."""
        if text not in self._token_ids:
            try:
                ids = self.tm.tokenizer.encode(text, add_special_tokens=False)
            except (AttributeError, TypeError, ValueError):
                ids = []
            self._token_ids[text] = ids[0] if len(ids) == 1 else None
        return self._token_ids[text]

    @functools.cached_property
    def system_fingerprint(self) -> str:
        info = getattr(self.tm, "scheduler_info", None)
        key = f"{anyserve_version()}|{self.tm.model_path}|{getattr(info, 'dtype', '')}"
        return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]

    def check_model(self, name: Optional[str]) -> None:
        if name not in self.model_names:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.served_model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")

    def ensure_alive(self) -> None:
        if not self.tm.is_alive():
            raise APIError(503, "the scheduler is not running; the server cannot generate "
                                "(check the server log and restart it)", code="scheduler_dead")
