"""Between the proto messages and the TokenizerManager's types.

Requests: a proto ``GenerateRequest`` becomes one ``io_struct.GenerateRequest`` per sample.
Responses: the TokenizerManager's cumulative output dicts become per-step deltas.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional

from engine.io_struct import GenerateRequest
from engine.sampling.sampling_params import SamplingParams

# Proto `optional` scalars: forwarded only when set, so unset ones keep the engine's defaults.
_OPTIONAL_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                  "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "seed",
                  "skip_special_tokens", "no_stop_trim")


def sampling_params_to_dict(msg: Any) -> dict[str, Any]:
    """SamplingParams message -> SGLang's sampling_params dict (only the keys the client set)."""
    d: dict[str, Any] = {k: getattr(msg, k) for k in _OPTIONAL_KEYS if msg.HasField(k)}
    if msg.stop:
        d["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        d["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.ignore_eos:
        d["ignore_eos"] = True
    if msg.logit_bias:
        d["logit_bias"] = dict(msg.logit_bias)
    constraint = msg.WhichOneof("constraint")
    if constraint is not None:
        d[constraint] = getattr(msg, constraint)
    return d


def to_generate_requests(msg: Any, rid: str) -> list[GenerateRequest]:
    """One GenerateRequest per sample: n > 1 runs as rids "<rid>-<i>", sample i seeded seed + i.
    Raises ValueError (naming the field) on a missing prompt or bad sampling parameters."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt: set either text or input_ids")
    params = sampling_params_to_dict(msg.sampling_params)
    SamplingParams.from_dict(params)        # one clear error here rather than n from the samples
    if msg.top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be >= 0, got {msg.top_logprobs_num}")
    n = params.pop("n", 1)
    seed = params.get("seed")
    # Unset is /generate's default, -1 (the last prompt token); the TokenizerManager checks the
    # range against the tokenized prompt.
    start = msg.logprob_start_len if msg.HasField("logprob_start_len") else -1
    reqs = []
    for i in range(n):
        sample_params = dict(params)
        if n > 1 and seed is not None:
            sample_params["seed"] = seed + i
        reqs.append(GenerateRequest(
            text=msg.text if which == "text" else None,
            input_ids=list(msg.input_ids.ids) if which == "input_ids" else None,
            sampling_params=sample_params,
            rid=rid if n == 1 else f"{rid}-{i}",
            stream=True,
            return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=start,
        ))
    return reqs


_FINISH_TYPES = {"stop": "FINISH_TYPE_STOP", "length": "FINISH_TYPE_LENGTH", "abort": "FINISH_TYPE_ABORT"}


def finish_reason_to_proto(pb2: ModuleType, reason: dict[str, Any]) -> Any:
    msg = pb2.FinishReason(type=pb2.FinishType.Value(
        _FINISH_TYPES.get(reason.get("type", ""), "FINISH_TYPE_UNSPECIFIED")))
    matched = reason.get("matched")
    if isinstance(matched, str):
        msg.matched_text = matched
    elif isinstance(matched, int):
        msg.matched_token_id = matched
    if reason.get("length") is not None:
        msg.length = int(reason["length"])
    if reason.get("message"):
        msg.message = str(reason["message"])
    return msg


@dataclass
class SampleStream:
    """Turns one sample's cumulative outputs into GenerateResponse deltas."""
    pb2: ModuleType
    rid: str
    index: int
    sent_text: int = 0
    sent_ids: int = 0
    sent_logprobs: int = 0
    sent_input_logprobs: int = 0

    def delta(self, out: dict[str, Any]) -> Optional[Any]:
        """The message for what is new in ``out``; None when nothing is."""
        meta = out.get("meta_info", {})
        text, ids = out.get("text", ""), out.get("output_ids", [])
        finish = meta.get("finish_reason")
        msg = self.pb2.GenerateResponse(rid=self.rid, index=self.index,
                                        token_ids=ids[self.sent_ids:], text=text[self.sent_text:])
        self.sent_text, self.sent_ids = max(self.sent_text, len(text)), max(self.sent_ids, len(ids))
        self._add_logprobs(msg, meta)
        if finish is not None:
            msg.finish_reason.CopyFrom(finish_reason_to_proto(self.pb2, finish))
            msg.usage.CopyFrom(self.pb2.Usage(prompt_tokens=meta.get("prompt_tokens", 0),
                                              completion_tokens=meta.get("completion_tokens", len(ids)),
                                              cached_tokens=meta.get("cached_tokens", 0)))
        elif not msg.token_ids and not msg.text and not msg.logprobs and not msg.input_logprobs:
            return None
        return msg

    def _add_logprobs(self, msg: Any, meta: dict[str, Any]) -> None:
        # The TokenizerManager yields its first output once the prompt has run, so every prompt
        # logprob lands in the first message; the count only guards against sending one twice.
        self.sent_input_logprobs = _add_entries(
            msg.input_logprobs, meta.get("input_token_logprobs"), meta.get("input_top_logprobs"),
            self.sent_input_logprobs)
        self.sent_logprobs = _add_entries(
            msg.logprobs, meta.get("output_token_logprobs"), meta.get("output_top_logprobs"), self.sent_logprobs)


def _add_entries(field: Any, token_lps: Optional[list], top_lps: Optional[list], sent: int) -> int:
    """Append TokenLogprob entries for positions sent.. of SGLang's [logprob, token_id, text]
    lists (a None logprob, the first prompt token's, leaves the field unset); the new count."""
    token_lps, top_lps = token_lps or [], top_lps or []
    for pos in range(sent, len(token_lps)):
        logprob, token_id, text = token_lps[pos]
        entry = field.add(token_id=token_id, text=text or "")
        if logprob is not None:
            entry.logprob = float(logprob)
        for top_lp, top_id, top_text in (top_lps[pos] if pos < len(top_lps) else None) or []:
            entry.top_logprobs.add(token_id=top_id, logprob=_num(top_lp), text=top_text or "")
    return max(sent, len(token_lps))


def _num(logprob: Optional[float]) -> float:
    return float("nan") if logprob is None else float(logprob)
