"""Constrained decoding without a model: schema preparation, the xgrammar backend's checks and
compiles, bitmask unpacking, the grammar manager's cache and failures, and the tool-call
parsers (whole and streamed) with the grammars that force calls."""
from __future__ import annotations

import json
import random
import threading
import time

import jsonschema
import pytest
import torch

from engine.constrained.base import GrammarError, GrammarKey, GrammarMatcher, grammar_key
from engine.constrained.bitmask import unpack_bitmask
from engine.constrained.grammar_manager import GrammarManager
from engine.constrained.schema_prep import EXACT_FORMATS, prepare_schema_text, unsupported_feature
from engine.constrained.xgrammar_backend import XGrammarBackend, json_schema_ebnf
from engine.entrypoints.openai.tool_calls import plan_tools, resolve_parser_name
from engine.entrypoints.openai.tool_parsers import (HermesParser, Llama3Parser, MistralParser, MistralV11Parser,
                                                    ToolCallStreamer, detect_parser, extract_tool_calls)
from engine.sampling.sampling_params import SamplingParams
from engine.sampling.sampling_batch_info import SamplingBatchInfo
from json_schema_corpus import SCHEMAS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(qwen2_tiny):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(str(qwen2_tiny))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return XGrammarBackend(tokenizer, 4096, [tokenizer.eos_token_id])


def accepts(backend: XGrammarBackend, key: GrammarKey, text: str) -> bool:
    m = backend.new_matcher(backend.compile(key)).matcher
    return m.accept_string(text) and m.is_completed()


# ---- schema preparation ----------------------------------------------------------------------
def test_corpus_has_thirty_schemas_that_all_compile(backend):
    assert len(SCHEMAS) >= 30
    for name, schema in SCHEMAS.items():
        key = GrammarKey("json_schema", json.dumps(schema))
        XGrammarBackend.validate(key)
        assert backend.compile(key) is not None, name


@pytest.mark.parametrize("schema, word", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {"maxLength": 2}}}}, "if"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"type": "string", "pattern": "a+", "maxLength": 3}, "pattern"),
    ({"type": "string", "format": "email", "minLength": 3}, "format"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
    ({"$defs": {"x": {"type": "object", "propertyNames": {"pattern": "^a"}}}, "$ref": "#/$defs/x"}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
])
def test_unenforced_keywords_are_refused(schema, word):
    with pytest.raises(GrammarError, match=word):
        XGrammarBackend.validate(GrammarKey("json_schema", json.dumps(schema)))


def test_keywords_inside_data_values_are_not_mistaken_for_schema():
    schema = {"enum": [{"not": 1}], "default": {"if": 2}, "const": {"contains": 3}}
    assert unsupported_feature(schema) is None
    assert unsupported_feature({"type": "integer", "multipleOf": 5}) is None


@pytest.mark.parametrize("kind, text, message", [
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", '"a string"', "must be a JSON object"),
    ("json_schema", '{"type": "foo"}', 'Unsupported type "foo"'),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
    ("json_schema", '{"type": "string", "minLength": 3, "maxLength": 1}', "minLength"),
    ("regex", "[a-", "Unclosed '['"),
    ("regex", "(?=a)b", "Lookahead"),
    ("ebnf", 'root ::= foo', 'Rule "foo" is not defined'),
    ("ebnf", 'start ::= "a"', "root"),
])
def test_invalid_constraints_name_the_compilers_message(backend, kind, text, message):
    key = GrammarKey(kind, text)
    with pytest.raises(GrammarError, match=kind) as info:
        XGrammarBackend.validate(key)
    assert message in str(info.value) and ".cc:" not in str(info.value)   # no C++ log prefix
    with pytest.raises(GrammarError):
        backend.compile(key)


@pytest.mark.parametrize("fmt", sorted(EXACT_FORMATS))
def test_exact_formats_accept_only_what_jsonschema_accepts(backend, fmt):
    rng = random.Random(7)
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    pick = rng.choice
    key = GrammarKey("json_schema", json.dumps({"type": "string", "format": fmt}))
    assert "pattern" in prepare_schema_text(key.text)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    compiled = backend.compile(key)
    tried = valid = 0
    for _ in range(800):
        date = f"{pick(['0000', '0001', '1900', '2000', '2023', '2024', digits(4)])}-" \
               f"{pick(['00', '01', '02', '04', '12', '13'])}-{pick(['00', '01', '28', '29', '30', '31'])}"
        clock = f"{pick(['00', '12', '23', '24'])}:{pick(['00', '59', '60'])}:{pick(['00', '59', '60'])}" \
                f"{pick(['', '.5', '.123', '.1234567', '.'])}{pick(['Z', '+01:00', '-05:30', '-24:00', ''])}"
        s = {"date": date, "time": clock, "date-time": f"{date}T{clock}",
             "ipv4": ".".join(pick(["0", "00", "010", "1", "99", "199", "255", "256", digits(3)])
                              for _ in range(pick([3, 4, 4, 5])))}[fmt]
        m = backend.new_matcher(compiled).matcher
        ok = m.accept_string(json.dumps(s)) and m.is_completed()
        tried += 1
        valid += ok
        assert not ok or checker.conforms(s, fmt), f"the grammar allows invalid {fmt} {s!r}"
    assert valid > 10, f"only {valid} of {tried} candidates were valid: the test lost its teeth"


def test_bounded_strings_never_hold_raw_control_characters(backend):
    key = GrammarKey("json_schema", json.dumps({"type": "string", "maxLength": 4}))
    assert accepts(backend, key, '"ab"')
    assert not accepts(backend, key, '"a\x01b"')
    assert "\\x1f" in json_schema_ebnf(key.text)


# ---- bitmasks --------------------------------------------------------------------------------
def test_unpack_bitmask_matches_bit_by_bit_reference():
    torch.manual_seed(0)
    vocab = 77
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32)
    mask = unpack_bitmask(bitmask, vocab, CPU)
    ref = torch.tensor([[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)])
    assert mask.shape == (3, vocab) and torch.equal(mask, ref)


def test_mask_rows_leave_unconstrained_rows_alone():
    params = [SamplingParams(temperature=0.0)] * 3
    info = SamplingBatchInfo.build(params, seeds=[0] * 3, steps=[0] * 3, output_ids=[[]] * 3,
                                   prompt_ids=[[1]] * 3, banned_token_ids=[[]] * 3, top_logprobs_nums=[0] * 3,
                                   return_logprob=[False] * 3, vocab_size=8, device=CPU)
    info.vocab_mask = torch.tensor([[True, False, False, False, False, True]])   # [1, 6]: row 1 only
    info.vocab_mask_rows = torch.tensor([1])
    logits = torch.arange(24, dtype=torch.float32).view(3, 8)
    info.apply_logit_adjustments(logits)
    assert torch.equal(logits[0], torch.arange(8.0)) and torch.equal(logits[2], torch.arange(16.0, 24.0))
    assert torch.isfinite(logits[1]).tolist() == [True, False, False, False, False, True, False, False]


# ---- the grammar manager ---------------------------------------------------------------------
class _Req:
    def __init__(self) -> None:
        self.grammar_future = None
        self.grammar = None
        self.finished_reason = None

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None


class _SlowBackend(XGrammarBackend):
    calls = 0

    def compile(self, key):
        type(self).calls += 1
        time.sleep(0.05)
        return super().compile(key)


def test_manager_compiles_once_per_key_and_reports_failures(tokenizer):
    mgr = GrammarManager(_SlowBackend(tokenizer, 4096, [tokenizer.eos_token_id]), max_batch_size=4)
    good = GrammarKey("regex", "[ab]{2}")
    reqs = [_Req() for _ in range(3)]
    for r in reqs:
        mgr.submit(r, good)
    bad = _Req()
    mgr.submit(bad, GrammarKey("regex", "(a"))
    assert all(GrammarManager.is_waiting(r) for r in reqs + [bad])
    deadline = time.monotonic() + 10
    failed = []
    while any(GrammarManager.is_waiting(r) for r in reqs + [bad]) and time.monotonic() < deadline:
        mgr.wait(reqs + [bad], 0.1)
        failed += mgr.poll(reqs + [bad])
    assert _SlowBackend.calls == 2
    assert all(isinstance(r.grammar, GrammarMatcher) for r in reqs) and failed == [bad]
    assert bad.finished_reason["status_code"] == 400 and "parenthesis" in bad.finished_reason["message"]
    mask, rows = mgr.vocab_mask([reqs[0], _Req(), reqs[1]], CPU)
    assert mask.shape == (2, mgr.backend.vocab_size) and rows.tolist() == [0, 2]
    allowed = set(torch.nonzero(mask[0]).squeeze(1).tolist())
    assert allowed and all(set(tokenizer.decode([t])) <= {"a", "b"} for t in allowed)
    assert mgr.vocab_mask([_Req()], CPU) == (None, None)
    reqs[1].finished_reason = {"type": "stop"}      # ended by the token read back while this step ran
    mask, rows = mgr.vocab_mask([reqs[0], reqs[1]], CPU)
    assert mask.shape == (1, mgr.backend.vocab_size) and rows.tolist() == [0]
    mgr.shutdown()


def test_grammar_key_of_sampling_params():
    assert grammar_key(SamplingParams()) is None
    assert grammar_key(SamplingParams(regex="a+")) == GrammarKey("regex", "a+")


# ---- tool-call parsers -----------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}

HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
LLAMA_TEXT = ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
              '{"name": "get_time", "parameters": {"tz": "UTC"}}')
MISTRAL_TEXT = ('Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {"tz": "UTC"}}]')
# Mistral v11+ (Small 3.x, Devstral, Magistral): one [TOOL_CALLS]name[ARGS]{...} per call
MISTRAL_V11_TEXT = ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}'
                    '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}')
MISTRAL_V11_IDS_TEXT = ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris", "days": 2}'
                        '[TOOL_CALLS]get_time[CALL_ID]Zz9Yy8Xx7[ARGS]{"tz": "UTC"}')


@pytest.mark.parametrize("parser, text, content", [
    (HermesParser(), HERMES_TEXT, "Let me check."),
    (Llama3Parser(), LLAMA_TEXT, None),
    (Llama3Parser(), "<|python_tag|>" + LLAMA_TEXT, None),
    (MistralParser(), MISTRAL_TEXT, "Let me check."),
    (MistralParser(), MISTRAL_TEXT.replace("Let me check. ", ""), None),
    # forced calls: one list each, back to back
    (MistralParser(), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'
                      '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "UTC"}}]', None),
    (MistralV11Parser(), MISTRAL_V11_TEXT, "Let me check."),
    (MistralV11Parser(), MISTRAL_V11_IDS_TEXT, None),
    (MistralV11Parser(), MISTRAL_V11_TEXT.replace("[TOOL_CALLS]", " [TOOL_CALLS] ").replace("[ARGS]", " [ARGS] "),
     "Let me check."),                          # blanks around the special tokens
    (MistralV11Parser(), MISTRAL_TEXT, "Let me check."),        # each reads the other's form
    (MistralParser(), MISTRAL_V11_TEXT, "Let me check."),
])
def test_whole_answer_parses_into_openai_tool_calls(parser, text, content):
    got_content, calls = extract_tool_calls(parser, text)
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("parser, text", [
    (HermesParser(), "Just text, no tools. <tool_ maybe"),
    (HermesParser(), "<tool_call>\n{not json}\n</tool_call>"),
    (HermesParser(), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),   # cut off
    (Llama3Parser(), '{"answer": 42}'),
    (Llama3Parser(), "The weather is fine."),
    (Llama3Parser(), '{"name": "get_weather", "parameters": {"ci'),
    (MistralParser(), "Plain [text] with [TOOL_ in it"),
    (MistralParser(), "[TOOL_CALLS] not a list"),
    (MistralParser(), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"ci'),                # cut off
    (MistralParser(), '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "UTC"}}, {"name": "get_w'),
    # whole objects with malformed JSON inside: content, not an exception
    (MistralParser(), '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": UTC}}]'),
    (Llama3Parser(), '{"name": "get_time", "parameters": {"tz": "UTC", "n": tru}}'),
    (MistralV11Parser(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'),                          # cut off
    (MistralV11Parser(), '[TOOL_CALLS]get_time[ARGS]{"tz": UTC}'),                              # malformed
    (MistralV11Parser(), '[TOOL_CALLS]get_time[ARGS]"UTC"'),                                    # not an object
    (MistralV11Parser(), "[TOOL_CALLS]get_time"),                                              # no [ARGS]
    (MistralV11Parser(), '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e'),
    (MistralV11Parser(), '[TOOL_CALLS]Sure, the time[ARGS]{"tz": "UTC"}'),                     # not a name
    (MistralV11Parser(), '[TOOL_CALLS][ARGS]{"tz": "UTC"}'),
    (MistralV11Parser(), "Plain [text] with [TOOL_ and [ARGS in it"),
])
def test_text_without_a_complete_call_is_plain_content(parser, text):
    assert extract_tool_calls(parser, text) == (text, [])


@pytest.mark.parametrize("parser, text", [(HermesParser(), HERMES_TEXT), (Llama3Parser(), LLAMA_TEXT),
                                          (MistralParser(), MISTRAL_TEXT), (HermesParser(), "No call here.\n"),
                                          (Llama3Parser(), "Hello {x}"), (MistralParser(), "A [list] of [TOOL_ things"),
                                          (MistralV11Parser(), MISTRAL_V11_TEXT), (MistralV11Parser(), MISTRAL_V11_IDS_TEXT),
                                          (MistralV11Parser(), "No [TOOL_CALLS]call here, [ARGS] or not")])
def test_streamed_deltas_add_up_to_the_whole_answer(parser, text):
    """Token-sized pieces (any split) give the same content and calls as the whole text."""
    rng = random.Random(len(text))
    streamer = ToolCallStreamer(parser)
    content, calls = "", {}
    cut = 0
    while cut < len(text):
        cut = min(len(text), cut + rng.randint(1, 4))
        delta, deltas = streamer.update(text[:cut], final=False)
        content += delta
        for d in deltas:
            c = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                assert c["name"] is None and d["type"] == "function"
                c["name"], c["id"] = d["function"]["name"], d["id"]
            c["arguments"] += d["function"]["arguments"]
    delta, deltas = streamer.update(text, final=True)
    content += delta
    for d in deltas:
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    whole_content, whole_calls = extract_tool_calls(parser, text)
    assert (content or None) == whole_content or (not whole_calls and content == whole_content)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]
    assert streamer.has_calls == bool(whole_calls)


def test_hermes_never_streams_a_partial_open_tag_as_content():
    streamer = ToolCallStreamer(HermesParser())
    assert streamer.update("Sure <tool_c")[0] == "Sure"
    delta, calls = streamer.update('Sure <tool_call>\n{"name": "get_time", "arguments": {"tz": "U')
    assert delta == "" and calls[0]["function"] == {"name": "get_time", "arguments": '{"tz": "U'}


def test_mistral_v11_malformed_call_is_content_and_the_good_ones_stand():
    text = '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}[TOOL_CALLS]get_weather[ARGS]{"city": Oslo}'
    content, calls = extract_tool_calls(MistralV11Parser(), text)
    assert content == '[TOOL_CALLS]get_weather[ARGS]{"city": Oslo}'
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_time", '{"tz": "UTC"}')]


def test_mistral_v11_one_call_with_call_id_after_content():
    content, calls = extract_tool_calls(MistralV11Parser(), 'Checking the time.\n[TOOL_CALLS]get_time[CALL_ID]'
                                                            'a1B2c3D4e[ARGS]{"tz": "CET"}')
    assert content == "Checking the time."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_time", '{"tz": "CET"}')]
    assert calls[0]["id"].startswith("call_")      # our id, not the model's [CALL_ID]


def test_mistral_v11_streams_split_inside_markers_and_json():
    """Chunks cut inside [TOOL_CALLS], the name, [ARGS], [CALL_ID] and the JSON: no marker
    piece leaks into content, the name is sent once whole, the arguments as they come."""
    streamer = ToolCallStreamer(MistralV11Parser())
    text = "Sure.[TOOL_C"
    assert streamer.update(text) == ("Sure.", [])
    for more in ("ALLS]get_ti", "me[AR"):
        text += more
        assert streamer.update(text) == ("", [])
    text += 'GS]{"tz": "U'
    content, deltas = streamer.update(text)
    assert content == "" and deltas == [{"index": 0, "id": streamer.ids[0], "type": "function",
                                         "function": {"name": "get_time", "arguments": '{"tz": "U'}}]
    text += 'TC"}[TOOL_CALLS]get_weather[CALL_'
    assert streamer.update(text) == ("", [{"index": 0, "function": {"arguments": 'TC"}'}}])
    text += "ID]a1B2c3D4e[ARGS"
    content, deltas = streamer.update(text)
    assert content == "" and deltas == [{"index": 1, "id": streamer.ids[1], "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]
    text += ']{"city": "Oslo"}'
    assert streamer.update(text) == ("", [{"index": 1, "function": {"arguments": '{"city": "Oslo"}'}}])
    assert streamer.update(text, final=True) == ("", [])


@pytest.mark.parametrize("text", [MISTRAL_V11_TEXT, MISTRAL_V11_IDS_TEXT,
                                  'Hi [TOOL_CALLS]get_time[CALL_ID]x[ARGS]{"tz": "UTC"} bye'])
def test_mistral_v11_streamed_one_character_at_a_time_matches_the_whole_answer(text):
    streamer = ToolCallStreamer(MistralV11Parser())
    content, args = "", {}
    for cut in range(1, len(text) + 1):
        delta, deltas = streamer.update(text[:cut], final=cut == len(text))
        content += delta
        for d in deltas:
            args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    whole_content, whole_calls = extract_tool_calls(MistralV11Parser(), text)
    assert (content or None) == whole_content and "[" not in content     # no piece of a marker
    assert list(args.values()) == [c["function"]["arguments"] for c in whole_calls]


def test_parser_detection_from_template_and_architecture():
    assert detect_parser(None, "... <tool_call> ...") == "qwen25"
    assert detect_parser("mistral", "{{ '<|python_tag|>' }}") == "llama3"
    assert detect_parser("llama", None) == "llama3" and detect_parser("qwen3", "") == "qwen25"
    assert detect_parser("mistral", "... [TOOL_CALLS] ...") == "mistral" and detect_parser("mistral", None) == "mistral"


V11_TEMPLATE = "{{- '[TOOL_CALLS]' + call.function.name + '[ARGS]' + call.function.arguments }}"
V3_TEMPLATE = "{{- '[TOOL_CALLS] [' + calls | tojson + ']' }}"


@pytest.mark.parametrize("model_type, template, tokens, name", [
    (None, V11_TEMPLATE, (), "mistral_v11"),                   # the template renders [ARGS]
    ("mistral", None, {"[ARGS]": 32, "[TOOL_CALLS]": 9}, "mistral_v11"),   # the tokenizer has it
    ("mistral", V3_TEMPLATE, ["[TOOL_CALLS]", "[ARGS]"], "mistral_v11"),  # the tokenizer wins
    ("mistral", V3_TEMPLATE, ["[TOOL_CALLS]"], "mistral"),
    (None, V3_TEMPLATE, (), "mistral"),
    ("llama", None, ["[ARGS]"], "llama3"),
])
def test_mistral_call_form_detected_from_template_and_tokenizer(model_type, template, tokens, name):
    assert detect_parser(model_type, template, tokens) == name


class _Tokenizer:
    chat_template = V3_TEMPLATE

    def get_added_vocab(self) -> dict[str, int]:
        return {"[TOOL_CALLS]": 9, "[ARGS]": 32}


def test_resolved_parser_reads_the_tokenizers_added_tokens(caplog):
    assert resolve_parser_name(None, None, _Tokenizer()) == "mistral_v11"
    assert resolve_parser_name("mistral", None, _Tokenizer()) == "mistral"     # the flag wins, with a warning
    assert "mistral_v11" in caplog.text
    assert resolve_parser_name("qwen25", None, _Tokenizer()) == "qwen25"


# ---- planning tool_choice, and the grammars that force calls ----------------------------------
@pytest.mark.parametrize("tools, choice, parser, backend, message", [
    (None, "required", "qwen25", "xgrammar", "no tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "qwen25", "xgrammar", "'nope'"),
    ([WEATHER], "required", None, "xgrammar", "--tool-call-parser"),
    ([WEATHER], "required", "qwen25", "none", "--grammar-backend none"),
])
def test_tool_choice_that_cannot_be_honoured_is_a_value_error(tools, choice, parser, backend, message):
    with pytest.raises(ValueError, match=message):
        plan_tools(tools, choice, True, parser, backend)


def test_none_and_auto_plans():
    assert plan_tools([WEATHER], "none", True, "qwen25", "xgrammar").template_tools is None
    auto = plan_tools([WEATHER], None, True, "qwen25", "xgrammar")
    assert auto.template_tools == [WEATHER] and auto.ebnf is None and auto.parser.name == "qwen25"
    assert plan_tools([WEATHER], "auto", True, None, "xgrammar").parser is None


@pytest.mark.parametrize("parser_name, good, bad", [
    ("qwen25",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
     ['<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>',          # city required
      '<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST"}}\n</tool_call>',           # not in enum
      'Hi <tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>', ""]),
    ("llama3", '{"name": "get_time", "parameters": {"tz": "UTC"}}',
     ['{"name": "get_weather", "parameters": {"city": "a very long city name"}}', "text"]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
                '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]',
     ['[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "PST"}}]',
      'Hi [TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]', ""]),
    ("mistral_v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
     ['[TOOL_CALLS]get_time[ARGS]{"tz": "PST"}', 'Hi [TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
      '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]', '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"} ', ""]),
])
def test_required_grammar_accepts_only_calls_of_the_offered_functions(backend, parser_name, good, bad):
    plan = plan_tools([WEATHER, CLOCK], "required", True, parser_name, "xgrammar")
    key = GrammarKey("ebnf", plan.ebnf)
    assert accepts(backend, key, good)
    for text in bad:
        assert not accepts(backend, key, text), text
    assert extract_tool_calls(plan.parser, good)[1]


def test_named_function_grammar_forces_exactly_one_call_of_it(backend):
    plan = plan_tools([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, True,
                      "qwen25", "xgrammar")
    key = GrammarKey("ebnf", plan.ebnf)
    one = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    assert accepts(backend, key, one)
    assert not accepts(backend, key, one + "\n" + one)
    assert not accepts(backend, key, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}\n</tool_call>')


def test_named_function_grammar_in_mistral_v11_form_forces_one_call(backend):
    plan = plan_tools([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, True,
                      "mistral_v11", "xgrammar")
    key = GrammarKey("ebnf", plan.ebnf)
    one = '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}'
    assert accepts(backend, key, one)
    assert not accepts(backend, key, one + one)
    assert not accepts(backend, key, '[TOOL_CALLS]get_weather[ARGS]{"city": "x"}')
    assert extract_tool_calls(plan.parser, one)[1][0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}


def test_tool_grammar_refuses_unenforceable_parameter_schemas():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(GrammarError, match="uniqueItems"):
        plan_tools([tool], "required", True, "qwen25", "xgrammar")


def test_validation_is_tokenizer_free_and_thread_safe():
    errors = []

    def run() -> None:
        try:
            for name, schema in list(SCHEMAS.items())[:10]:
                XGrammarBackend.validate(GrammarKey("json_schema", json.dumps(schema)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
