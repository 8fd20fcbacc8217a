"""Constrained decoding end to end in the offline Engine (tiny random models on the CPU): the
random model makes structure only through the grammar, so every output that finishes with
"stop" must parse and validate. Also n > 1, streaming, seeds, stop strings, max tokens, the
radix cache, retraction, compile failures and compiles that take long."""
from __future__ import annotations

import asyncio
import json
import random
import re
import time

import jsonschema
import pytest

from engine import Engine
from engine.constrained.base import GrammarKey
from engine.entrypoints.openai.tool_calls import plan_tools, resolve_parser_name
from engine.entrypoints.openai.tool_parsers import extract_tool_calls
from json_schema_corpus import SCHEMAS

# Schemas whose strings have no length bound: a random model may run to max_new_tokens there.
UNBOUNDED = {"format_email"}
SAMPLINGS = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]


def random_prompts(vocab: int, n: int, lo: int, hi: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def validate(text: str, schema: dict) -> None:
    cls = jsonschema.Draft202012Validator
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))


def finish(out: dict) -> str:
    return out["meta_info"]["finish_reason"]["type"]


@pytest.fixture(scope="module")
def eng(qwen2_tiny):
    e = Engine(model_path=str(qwen2_tiny), device="cpu", dtype="float32")
    yield e
    e.shutdown()


def test_every_output_that_stops_validates_against_its_schema(eng):
    prompts, params, names = [], [], []
    for name, schema in SCHEMAS.items():
        for sp in SAMPLINGS:
            prompts.append(f"Write {name} as JSON:")
            params.append({**sp, "json_schema": json.dumps(schema), "max_new_tokens": 256})
            names.append(name)
    outs = eng.generate(prompts, params)
    stopped = {name: 0 for name in SCHEMAS}
    for name, out in zip(names, outs):
        if finish(out) == "stop":
            stopped[name] += 1
            validate(out["text"], SCHEMAS[name])
        else:
            assert finish(out) == "length", out["meta_info"]
    never = [n for n, k in stopped.items() if k == 0 and n not in UNBOUNDED]
    assert not never, f"no sample of {never} finished: the test checks nothing there"
    eng.scheduler.check_memory_whole()


REGEXES = {
    "email": r"[a-z]{1,8}\.?[a-z]{0,4}@[a-z]{2,8}\.(com|org|net)",
    "iso_date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
}


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regex_outputs_match_fully(eng, name):
    pattern = REGEXES[name]
    outs = eng.generate([f"Give a {name}:"] * 4, [{**sp, "regex": pattern, "max_new_tokens": 64}
                                                  for sp in SAMPLINGS + [{"temperature": 1.5, "seed": 3}]])
    for out in outs:
        assert finish(out) == "stop", out
        assert re.fullmatch(pattern, out["text"]), out["text"]


# Arithmetic with parentheses one level deep and a bounded number of terms, so that every
# document ends (a random model would otherwise nest forever); the parser below takes any depth.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= number | "(" inner ")"
inner ::= number (("+" | "-" | "*" | "/") number){0,3}
number ::= [1-9] [0-9]? [0-9]?
"""


def parse_arithmetic(text: str) -> float:
    """A recursive-descent parser (and evaluator) for the grammar above; raises on bad input."""
    pos = 0

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def eat(c: str) -> None:
        nonlocal pos
        assert peek() == c, f"expected {c!r} at {pos} in {text!r}"
        pos += 1

    def number() -> float:
        nonlocal pos
        m = re.match(r"[1-9][0-9]{0,2}", text[pos:])
        assert m, f"expected a number at {pos} in {text!r}"
        pos += m.end()
        return float(m.group())

    def factor() -> float:
        if peek() == "(":
            eat("(")
            v = expr()
            eat(")")
            return v
        return number()

    def term() -> float:
        v = factor()
        while peek() in ("*", "/"):
            op = peek()
            eat(op)
            r = factor()
            v = v * r if op == "*" else v / r
        return v

    def expr() -> float:
        v = term()
        while peek() in ("+", "-"):
            op = peek()
            eat(op)
            r = term()
            v = v + r if op == "+" else v - r
        return v

    value = expr()
    assert pos == len(text), f"trailing text at {pos} in {text!r}"
    return value


def test_ebnf_arithmetic_outputs_parse(eng):
    assert parse_arithmetic("(1+22)*3-4/5") == pytest.approx((1 + 22) * 3 - 4 / 5)
    with pytest.raises(AssertionError):
        parse_arithmetic("1+*2")
    params = [{"temperature": 1.0, "seed": s, "ebnf": ARITHMETIC, "max_new_tokens": 256} for s in range(6)]
    outs = eng.generate(["Compute:"] * 7, params + [{"temperature": 0.0, "ebnf": ARITHMETIC, "max_new_tokens": 256}])
    for out in outs:
        assert finish(out) == "stop", out
        parse_arithmetic(out["text"])
    assert any("(" in o["text"] for o in outs)


@pytest.mark.parametrize("params, message", [
    ({"json_schema": '{"type": "foo"}'}, 'Unsupported type "foo"'),
    ({"json_schema": "{oops"}, "not valid JSON"),
    ({"json_schema": '{"type": "array", "uniqueItems": true}'}, "uniqueItems"),
    ({"regex": "(ab"}, "parenthesis"),
    ({"ebnf": "root ::= missing"}, "missing"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one"),
])
def test_bad_constraint_is_a_value_error_and_the_engine_keeps_serving(eng, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        eng.generate("Hi", {**params, "max_new_tokens": 8})
    assert finish(eng.generate("Hi", {"max_new_tokens": 2, "ignore_eos": True})) == "length"


def test_a_compile_that_fails_in_the_scheduler_is_a_value_error_too(eng, monkeypatch):
    import engine.entrypoints.tokenizer_manager as tm_module

    monkeypatch.setattr(tm_module, "_constraint_error", lambda backend, key: None)   # skip the front end's check
    with pytest.raises(ValueError, match="EBNF parser error"):
        eng.generate("Hi", {"ebnf": "root ::= (", "max_new_tokens": 8})
    assert not eng.scheduler.waiting and not eng.scheduler.reqs_by_rid


def test_n_samples_and_streaming_with_a_schema(eng):
    schema = SCHEMAS["realistic_event"]
    params = {"json_schema": json.dumps(schema), "max_new_tokens": 256, "temperature": 1.0, "seed": 11, "n": 3}
    outs = eng.generate("Plan a meeting:", params)
    assert len(outs) == 3 and len({o["text"] for o in outs}) > 1
    streamed: dict[int, str] = {}
    for chunk in eng.generate("Plan a meeting:", params, stream=True):
        i = chunk["index"]
        assert chunk["text"].startswith(streamed.get(i, "")), "a stream's text only grows"
        streamed[i] = chunk["text"]
    assert [streamed[i] for i in range(3)] == [o["text"] for o in outs]
    for out in outs:
        if finish(out) == "stop":
            validate(out["text"], schema)


def test_seeded_sample_is_the_same_alone_and_in_a_mixed_batch(eng):
    constrained = {"json_schema": json.dumps(SCHEMAS["object_with_arrays"]), "max_new_tokens": 128,
                   "temperature": 1.2, "seed": 5}
    free = {"max_new_tokens": 24, "temperature": 1.0, "seed": 9, "ignore_eos": True}
    alone = eng.generate("Scores:", constrained)["output_ids"]
    free_alone = eng.generate("Once upon", free)["output_ids"]
    batch = eng.generate(["Once upon", "Scores:", "Other:"],
                         [free, constrained, {**constrained, "seed": 6}])
    assert batch[1]["output_ids"] == alone
    assert batch[0]["output_ids"] == free_alone, "an unconstrained row must not feel its neighbours' masks"


def test_stop_string_and_max_tokens_end_a_document_early(eng):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "string", "maxLength": 30}},
                         "required": ["a"]})
    out = eng.generate("x", {"json_schema": schema, "stop": ['"a"'], "max_new_tokens": 64})
    assert finish(out) == "stop" and out["meta_info"]["finish_reason"]["matched"] == '"a"' and out["text"] == "{"
    out = eng.generate("x", {"json_schema": schema, "max_new_tokens": 3})
    assert finish(out) == "length" and out["meta_info"]["completion_tokens"] == 3


def test_min_new_tokens_and_ignore_eos_cannot_outlast_the_document(eng):
    for extra in ({"min_new_tokens": 50}, {"ignore_eos": True}):
        out = eng.generate("Pick:", {"json_schema": json.dumps(SCHEMAS["string_enum"]), "max_new_tokens": 60,
                                     **extra})
        assert finish(out) == "stop" and json.loads(out["text"]) in ("red", "green", "blue")


def test_radix_cache_serves_the_prompt_of_a_repeated_constrained_request(eng):
    params = {"regex": REGEXES["ipv4"], "max_new_tokens": 32, "temperature": 1.0, "seed": 3}
    prompt = "A long shared prompt about networks and addresses, " * 4
    first = eng.generate(prompt, params)
    second = eng.generate(prompt, params)
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["text"] == first["text"]


def test_retracted_requests_resume_their_grammar(qwen2_tiny):
    """Documents longer than max_new_tokens (like ignore_eos) in a pool too small for all of
    them: retracted requests must continue from their matcher's state, so their tokens equal
    a big pool's and every output is a prefix the grammar accepts."""
    import xgrammar as xgr

    schema = {"type": "array", "minItems": 20, "items": {"type": "object", "properties": {
        "k": {"type": "string", "maxLength": 4}, "v": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["k", "v"]}}
    prompts = random_prompts(2000, 64, 20, 60)
    params = [{"json_schema": json.dumps(schema), "max_new_tokens": 40, "temperature": 1.0, "seed": i}
              for i in range(64)]
    with Engine(model_path=str(qwen2_tiny), device="cpu", dtype="float32") as big:
        expected = [o["output_ids"] for o in big.generate(input_ids=prompts, sampling_params=params)]
    with Engine(model_path=str(qwen2_tiny), device="cpu", dtype="float32", max_total_tokens=640,
                page_size=4, chunked_prefill_size=64) as small:
        outs = small.generate(input_ids=prompts, sampling_params=params)
        assert small.get_stats().num_retractions > 0, "the pool was meant to be too small"
        small.scheduler.check_memory_whole()
        backend = small.scheduler.grammar.backend
        compiled = backend.compile(GrammarKey("json_schema", params[0]["json_schema"]))
    assert [o["output_ids"] for o in outs] == expected
    for out in outs:
        assert finish(out) == "length"
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in out["output_ids"])


def test_a_slow_compile_does_not_hold_up_other_requests(eng):
    backend = eng.scheduler.grammar.backend
    real = backend.compile

    def slow(key):
        time.sleep(1.0)
        return real(key)

    backend.compile = slow
    try:
        async def run() -> dict[str, float]:
            done: dict[str, float] = {}
            start = time.monotonic()

            async def one(name: str, params: dict) -> None:
                await eng.async_generate("Hi", params)
                done[name] = time.monotonic() - start

            await asyncio.gather(one("constrained", {"regex": "[xyz]{4}", "max_new_tokens": 8}),
                                 one("free", {"max_new_tokens": 8, "ignore_eos": True}))
            return done

        done = eng.loop.run_until_complete(run())
    finally:
        del backend.compile
    assert done["free"] < 0.8 <= done["constrained"], done


def test_grammar_backend_none_refuses_constraints(qwen2_tiny):
    with Engine(model_path=str(qwen2_tiny), device="cpu", grammar_backend="none") as e:
        with pytest.raises(ValueError, match="--grammar-backend none"):
            e.generate("x", {"regex": "a"})


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}


@pytest.mark.parametrize("arch, chat, parser", [("llama", None, "llama3"), ("qwen2", None, "qwen25"),
                                               ("mistral", None, "mistral"), ("mistral", "mistral_v11", "mistral_v11")])
def test_required_tool_choice_always_gives_a_parseable_call(make_tiny, arch, chat, parser):
    model = make_tiny(arch, **({"chat": chat} if chat else {}))
    plan = plan_tools([WEATHER], "required", False, parser, "xgrammar")
    with Engine(model_path=str(model), device="cpu", dtype="float32") as e:
        assert resolve_parser_name(None, str(model), e.tokenizer_manager.tokenizer) == parser
        prompt = e.tokenizer_manager.apply_chat_template([{"role": "user", "content": "Weather?"}], plan.template_tools)
        # as the chat endpoint asks: Mistral's call marker is a special token the text must keep
        outs = e.generate(input_ids=[prompt] * 4, sampling_params=[
            {"ebnf": plan.ebnf, "max_new_tokens": 96, "temperature": 1.0, "seed": s,
             "skip_special_tokens": not plan.parser.keeps_special_tokens} for s in range(4)])
    for out in outs:
        assert finish(out) == "stop", out
        if parser == "mistral_v11":     # the form the model's template writes, markers as special tokens
            assert re.fullmatch(r"\[TOOL_CALLS\]get_weather\[ARGS\]\{.*\}", out["text"]), out["text"]
        content, calls = extract_tool_calls(plan.parser, out["text"])
        assert content is None and len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])
