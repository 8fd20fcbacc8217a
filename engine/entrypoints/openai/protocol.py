"""Request and response models of the HTTP API, with all request validation in one place.

Types and shapes are checked by pydantic (strict: no "1" for 1, no true for 1); values of
sampling parameters are checked by `SamplingParams` (one place for their ranges), called
from `sampling_params()` here, so that a bad request fails before anything is generated.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializerFunctionWrapHandler, field_validator,
                      model_serializer, model_validator)

from engine.sampling.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

MAX_COMPLETION_LOGPROBS = 5
MAX_N = 128
# json_object: any JSON object (the grammar engine turns this schema into its grammar).
PERMISSIVE_JSON_SCHEMA = {"type": "object"}
# SamplingParams' names back to the OpenAI names the client used, for error messages.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}

PromptItem = Union[str, list[int]]
# Arguments of the tokenizer's apply_chat_template that the server sets itself (or that would
# change what it does), so chat_template_kwargs may not: the request's own fields carry them.
RESERVED_TEMPLATE_KWARGS = ("messages", "conversation", "tools", "documents", "add_generation_prompt",
                            "continue_final_message", "chat_template", "tokenize", "return_dict",
                            "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
                            "max_length", "tokenizer_kwargs")


class _Model(BaseModel):
    # Unknown fields are ignored, as SDKs send fields we do not use (store, metadata, ...).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False,
                              populate_by_name=True)


# ---- OpenAI requests -----------------------------------------------------------------------
class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object: "
                             '{"name": ..., "schema": {...}}')
        return self


def _stop_list(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise ValueError(f"must be a string or a list of strings, got {v!r}")


class _SamplingRequest(_Model):
    """Fields that chat and completions share (OpenAI's plus SGLang's extensions)."""
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: Optional[dict[str, float]] = None
    skip_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None
    json_schema: Optional[str] = None     # SGLang's extensions: a schema as JSON text, a regex, a grammar
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    _check_stop = field_validator("stop", mode="before")(_stop_list)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _grammar(self, grammar_enabled: bool) -> dict[str, str]:
        out: dict[str, str] = {}
        rf = self.response_format
        if rf is not None and rf.type == "json_schema":
            out["json_schema"] = json.dumps(rf.json_schema.schema_ or PERMISSIVE_JSON_SCHEMA)
        elif rf is not None and rf.type == "json_object":
            out["json_schema"] = json.dumps(PERMISSIVE_JSON_SCHEMA)
        if self.json_schema is not None:
            if out:
                raise ValueError(f"json_schema cannot be combined with response_format {rf.type!r}: "
                                 "give the schema once")
            out["json_schema"] = self.json_schema
        if self.regex is not None:
            out["regex"] = self.regex
        if self.ebnf is not None:
            out["ebnf"] = self.ebnf
        if out and not grammar_enabled:
            name = "response_format" if rf is not None and rf.type != "text" else next(iter(out))
            raise ValueError(f"{name} needs constrained decoding, but the server was started with "
                             "--grammar-backend none; restart it with a grammar backend or drop "
                             "the constraint")
        return out

    def sampling_params(self, max_new_tokens: Optional[int], grammar_enabled: bool) -> dict[str, Any]:
        """SGLang's sampling_params dict for one sample (n is expanded by the caller),
        validated by SamplingParams; a ValueError names the field as the client spelled it."""
        sp: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "min_new_tokens": self.min_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "stop": self.stop or [],
            "stop_token_ids": self.stop_token_ids or [], "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens, "seed": self.seed,
        }
        if self.logit_bias is not None:
            sp["logit_bias"] = self.logit_bias
        sp.update(self._grammar(grammar_enabled))
        try:
            SamplingParams.from_dict(sp)
        except ValueError as e:
            msg = str(e)
            for ours, theirs in _OPENAI_NAMES.items():
                msg = msg.replace(ours, theirs)
            raise ValueError(msg) from None
        return sp


class ChatMessage(_Model):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None     # an earlier answer's reasoning (templates may show it)

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {v!r}; use system, user, assistant or tool "
                             "(developer is read as system)")
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"must be a string or a list of content parts, got {type(v).__name__}")
        for j, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"part [{j}] must be an object like {{\"type\": \"text\", \"text\": ...}}")
            if part.get("type") != "text":
                raise ValueError(f"part [{j}] has type {part.get('type')!r}; only 'text' content "
                                 "parts are supported by this server")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part [{j}] of type 'text' needs a string 'text'")
        return v

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs 'content'")
        return self

    def to_template_dict(self) -> dict[str, Any]:
        """The message as HF chat templates expect it: content as one string (text parts
        joined by newlines)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content)
        d: dict[str, Any] = {"role": self.role, "content": content if content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


class _ChatTemplateInputs(_Model):
    """What the chat template reads besides the messages: tools, and SGLang's chat_template_kwargs
    (extra template variables, e.g. {"enable_thinking": false})."""
    tools: Optional[list[dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs_not_reserved(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        taken = [k for k in v or {} if k in RESERVED_TEMPLATE_KWARGS]
        if taken:
            raise ValueError(f"must not set {taken[0]!r}: the server passes it to the chat template "
                             "itself (use the request's messages and tools fields)")
        return v

    @field_validator("tools")
    @classmethod
    def _tools_shape(cls, v: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
        for i, tool in enumerate(v or []):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict):
                raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"tools[{i}].function.name must be a non-empty string")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        return v


class ChatCompletionRequest(_SamplingRequest, _ChatTemplateInputs):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: bool = True
    # SGLang's: whether a --reasoning-parser server returns the reasoning apart
    # (reasoning_content), and whether a stream sends it as it comes (false: one
    # reasoning_content delta once the reasoning ends).
    separate_reasoning: bool = True
    stream_reasoning: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, v: Any) -> Any:
        if v is None or v in ("none", "auto", "required"):
            return v
        fn = v.get("function") if isinstance(v, dict) else None
        if not (isinstance(v, dict) and v.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise ValueError('must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        return v

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: list[Union[str, list[int]]]     # normalized: always a list of prompts
    max_tokens: Optional[int] = 16          # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        return normalize_prompts(v, "prompt")[0]

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported by this server (no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) is not supported unless it equals n ({self.n})")
        return self


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def normalize_prompts(v: Any, name: str) -> tuple[list[PromptItem], bool]:
    """A string, a list of strings, a list of token ids or a list of token-id lists → a
    non-empty list of prompts (each a non-empty string or a non-empty list of ids), and
    whether the input was a batch."""
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    batch = True
    if isinstance(v, str):
        v, batch = [v], False
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        v, batch = [v], False
    if not isinstance(v, list) or not v:
        raise ValueError(f"must be {shape}, got {'an empty list' if v == [] else repr(v)[:80]}")
    for i, p in enumerate(v):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"{name}[{i}] is an empty string; send at least one character")
        elif isinstance(p, list):
            if not p:
                raise ValueError(f"{name}[{i}] is an empty token list")
            bad = [t for t in p if not _is_id(t)]
            if bad:
                raise ValueError(f"{name}[{i}] holds {bad[0]!r}; token ids are integers >= 0")
        else:
            raise ValueError(f"must be {shape}; item [{i}] is {type(p).__name__}")
    if len({type(p) for p in v}) > 1:
        raise ValueError(f"must be {shape}, not a mix of strings and token lists")
    return v, batch


# ---- SGLang-native request -----------------------------------------------------------------
class GenerateReqInput(_Model):
    """SGLang's /generate body: one prompt or a batch, each expanded to n samples."""
    text: Optional[Any] = None
    input_ids: Optional[Any] = None
    sampling_params: Optional[Union[dict[str, Any], list[dict[str, Any]]]] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    top_logprobs_num: Union[int, list[int]] = 0
    # with return_logprob: prompt tokens from here on get logprobs (meta_info.input_token_logprobs);
    # -1, SGLang's default, the last prompt token only
    logprob_start_len: Union[int, list[int]] = -1
    rid: Optional[Union[str, list[str]]] = None
    return_text_in_logprobs: bool = True
    _prompts: list[PromptItem] = PrivateAttr(default_factory=list)
    _batch: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _normalize(self) -> "GenerateReqInput":
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        name = "text" if self.text is not None else "input_ids"
        prompts, self._batch = normalize_prompts(getattr(self, name), name)
        want = str if name == "text" else list
        if not all(isinstance(p, want) for p in prompts):
            raise ValueError(f"{name} must hold {'strings' if want is str else 'token ids'}")
        self._prompts = prompts
        for field in ("sampling_params", "return_logprob", "top_logprobs_num", "logprob_start_len",
                      "rid"):
            v = getattr(self, field)
            if isinstance(v, list) and (not self._batch or len(v) != len(prompts)):
                raise ValueError(f"{field} is a list of {len(v)} but the request has "
                                 f"{len(prompts) if self._batch else 'a single'} prompt(s); "
                                 "give one value, or one per prompt")
        if isinstance(self.rid, str) and self._batch:
            raise ValueError("rid must be a list of strings, one per prompt, for a batch")
        for i in range(len(prompts)):
            n = (self._per(self.sampling_params, i, None) or {}).get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
                raise ValueError(f"sampling_params.n must be an integer in [1, {MAX_N}], got {n!r}")
        return self

    @staticmethod
    def _per(v: Any, i: int, default: Any) -> Any:
        if isinstance(v, list):
            return v[i]
        return default if v is None else v

    @property
    def is_batch(self) -> bool:
        return self._batch

    def expand(self) -> list[tuple[PromptItem, dict[str, Any], Optional[str], bool, int, int]]:
        """(prompt, sampling_params with n=1, rid, return_logprob, top_logprobs_num,
        logprob_start_len) per sample, in the order index = prompt_i * n + j; sample j's seed is
        seed + j."""
        out = []
        for i, prompt in enumerate(self._prompts):
            sp = dict(self._per(self.sampling_params, i, {}))
            n = sp.pop("n", 1)
            rid = self._per(self.rid, i, None)
            for j in range(n):
                spj = dict(sp)
                for key in ("seed", "sampling_seed"):
                    if n > 1 and isinstance(spj.get(key), int):
                        spj[key] += j
                out.append((prompt, spj, f"{rid}-{j}" if rid and n > 1 else rid,
                            self._per(self.return_logprob, i, False),
                            self._per(self.top_logprobs_num, i, 0),
                            self._per(self.logprob_start_len, i, -1)))
        return out


# ---- OpenAI responses ----------------------------------------------------------------------
class _Out(BaseModel):
    """Responses: built by us, so no strictness (and logprobs are clamped, never -inf)."""


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0


def _without_none(handler: SerializerFunctionWrapHandler, model: BaseModel, *names: str) -> dict[str, Any]:
    """The model's dict without the optional fields named when they are None (fields that only
    some servers or requests have, so that the others' answers keep their shape)."""
    d = handler(model)
    for name in names:
        if d.get(name) is None:
            d.pop(name, None)
    return d


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0          # reasoning tokens included
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: Optional[CompletionTokensDetails] = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler, self, "completion_tokens_details")


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[TokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(_Out):
    role: str = "assistant"
    content: Optional[str] = None
    # [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]
    tool_calls: Optional[list[dict[str, Any]]] = None
    reasoning_content: Optional[str] = None     # with --reasoning-parser

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler, self, "reasoning_content")


class ChatChoice(_Out):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Out):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(_Out):
    index: int
    delta: dict[str, Any]
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Out):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(_Out):
    """Also each streamed chunk (OpenAI uses the same object for both)."""
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TokenizeRequest(_ChatTemplateInputs):
    """POST /v1/tokenize (SGLang) and /tokenize (vLLM): a prompt, a list of prompts, or chat
    messages rendered by the chat template exactly as /v1/chat/completions renders them."""
    model: Optional[str] = None
    prompt: Optional[Union[str, list[str]]] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True     # prompts only (a chat template writes its own)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt (a string or a list of strings) and messages")
        if self.messages is None and (self.tools is not None or self.chat_template_kwargs is not None):
            raise ValueError("tools and chat_template_kwargs go with messages, not with prompt")
        return self


class DetokenizeRequest(_Model):
    """POST /v1/detokenize (SGLang) and /detokenize (vLLM): token ids, or a list of them, to text."""
    model: Optional[str] = None
    tokens: Union[list[int], list[list[int]]]
    skip_special_tokens: bool = True


class ModelCard(_Out):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "anyserve"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Out):
    object: str = "list"
    data: list[ModelCard]
