"""make_model writes real Hugging Face checkpoints: transformers loads and runs them, the tokenizer round-trips
text and keeps each family's special tokens whole, chat templates render every role, output is deterministic."""
from __future__ import annotations

import argparse
import json
import logging
import threading
import unicodedata

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.models import make_model as mm

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Lisbon?"}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call0001A", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Lisbon"}'}}]},
    {"role": "tool", "tool_call_id": "call0001A", "content": "Sunny, high of 24"},
    {"role": "assistant", "content": "A high of 24 °C."},
    {"role": "user", "content": "Thanks!"},
]
# What each family's template must produce for a system + user prompt with the generation prompt.
SIMPLE_PROMPT = {
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be kind.\n\nHi there[/INST]",
    "qwen2": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
}
TEXTS = {
    "ascii": "Hello, world! The 3 quick foxes cost $12.50 (no refunds).",
    "accented": "Ça coûte 5 € — naïve Zürich, Łódź, São Paulo, Ærøskøbing.",
    "chinese": "今天早上下了一场小雨，我们喝了一杯热茶。",
    "emoji": "Launch it 🚀🎉 👨‍👩‍👧‍👦 👍🏽 🇯🇵 ❤️",
    "code": "def f(x):\n\treturn {\"a\": [1, 2]}  # ok\n\n\n  trailing  ",
}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits)  # logits: [steps, vocab]


def test_each_arch_loads_and_generates(tiny_model):
    arch, path = tiny_model
    model, tok = _load(path)
    config = model.config
    assert config.architectures == [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.max_position_embeddings) == (64, 2, 4, 2, 2048)
    assert config.vocab_size == len(tok) and config.vocab_size % 64 == 0
    raw = json.loads((path / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "float32"
    if arch == "llama":
        assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == 500000.0
        assert config.tie_word_embeddings
    if arch == "mistral":
        assert raw["sliding_window"] is None and not config.tie_word_embeddings
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert config.head_dim == 32 != config.hidden_size // config.num_attention_heads
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (32,)

    tokens, _ = _greedy(model, tok("The harbor town wakes early").input_ids, steps=16)
    assert len(tokens) == 16 and max(tokens) < len(tok) and tok.decode(tokens)


def test_greedy_decode_is_varied_and_far_from_ties(tiny_model):
    """Tests compare greedy tokens with transformers token for token: top-2 logits must not nearly tie, and
    continuations must depend on the prompt (a random model may still settle into a short loop)."""
    arch, path = tiny_model
    model, tok = _load(path)
    gaps, continuations = [], []
    for prompt in ["Dear Tomas,", "def fibonacci(n):", "中文：今天早上", "User: Why is the sky blue?"]:
        tokens, logits = _greedy(model, tok(prompt).input_ids, steps=16)
        top2 = logits.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
        continuations.append(tuple(tokens))
    assert len(set(continuations)) == 4 and len({t for c in continuations for t in c}) >= 16, continuations
    gaps = torch.cat(gaps)
    assert gaps.min() > 5e-4, f"{arch}: a top-2 gap of {gaps.min():.2g} is too close to fp32 noise (~5e-5)"
    assert gaps.median() > 0.5


@pytest.mark.parametrize("kind", list(TEXTS))
def test_tokenizer_round_trips_text(tiny_model, kind):
    arch, path = tiny_model
    tok = AutoTokenizer.from_pretrained(path)
    text = unicodedata.normalize("NFC", TEXTS[kind])
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_and_bos_follows_the_family(tiny_model):
    arch, path = tiny_model
    tok = AutoTokenizer.from_pretrained(path)
    family = mm.FAMILIES[arch]
    for token in family.control_tokens + family.text_tokens:
        ids = tok(token, add_special_tokens=False).input_ids
        assert ids == [tok.convert_tokens_to_ids(token)], f"{token} is not one id: {ids}"
        assert tok.decode(ids, skip_special_tokens=True) == ("" if token in family.control_tokens else token)
    assert tok.eos_token == family.eos_token
    ids = tok("hello").input_ids
    if family.bos_token:
        assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids(family.bos_token)
        assert tok("hello", add_special_tokens=False).input_ids == ids[1:]
    else:
        assert tok.bos_token is None and ids == tok("hello", add_special_tokens=False).input_ids


def test_generation_config_has_stop_tokens_and_no_sampling_defaults(tiny_model):
    arch, path = tiny_model
    tok = AutoTokenizer.from_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    stops = [tok.convert_tokens_to_ids(t) for t in mm.FAMILIES[arch].stop_tokens]
    assert gen["eos_token_id"] == (stops if len(stops) > 1 else stops[0])
    assert gen["do_sample"] is False and not {"temperature", "top_p", "top_k"} & gen.keys()
    assert "bos_token_id" in gen


def test_chat_template_renders_every_role(tiny_model):
    arch, path = tiny_model
    tok = AutoTokenizer.from_pretrained(path)
    simple = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(simple, tokenize=False, add_generation_prompt=True) == SIMPLE_PROMPT[arch]

    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    for piece in ["Answer briefly.", "Weather in Lisbon?", '"city": "Lisbon"', "Sunny, high of 24", "A high of 24 °C.",
                  "Thanks!", '"get_weather"', "Current weather of a city."]:
        assert piece in text, f"{arch} template lost {piece!r}:\n{text}"
    expected_markers = {
        "llama": ["<|start_header_id|>ipython<|end_header_id|>", '{"name": "get_weather", "parameters": '],
        "mistral": ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", '"call_id": "call0001A"'],
        "qwen2": ["<tools>", "<tool_call>\n{\"name\": \"get_weather\"", "<tool_response>"],
        "qwen3": ["<tools>", "<tool_call>\n{\"name\": \"get_weather\"", "<tool_response>"],
    }[arch]
    for marker in expected_markers:
        assert marker in text, f"{arch} template lacks {marker!r}:\n{text}"
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text


def test_qwen3_template_shows_reasoning_only_after_the_last_question(qwen3_tiny):
    tok = AutoTokenizer.from_pretrained(qwen3_tiny)
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2", "reasoning_content": "old thought"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nnew thought\n</think>\n\n4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "old thought" not in text and "<think>\nnew thought\n</think>\n\n4<|im_end|>" in text
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_sharded_checkpoint_loads_like_the_single_file(make_tiny):
    single, sharded = make_tiny("qwen2"), make_tiny("qwen2", num_shards=3)
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_file(single / "model.safetensors"))
    a, b = AutoModelForCausalLM.from_pretrained(single), AutoModelForCausalLM.from_pretrained(sharded)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    ids = torch.tensor([[5, 17, 300, 42]])
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, make_tiny):
    first = mm.make_model("mistral", "tiny", tmp_path / "a", seed=7)
    again = mm.make_model("mistral", "tiny", tmp_path / "b", seed=7)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = load_file(make_tiny("mistral") / "model.safetensors")
    assert not torch.equal(load_file(first / "model.safetensors")["lm_head.weight"], other["lm_head.weight"])


def test_bfloat16_weights_are_the_float32_weights_rounded(make_tiny):
    fp32 = load_file(make_tiny("qwen3") / "model.safetensors")
    bf16 = load_file(make_tiny("qwen3", dtype="bfloat16") / "model.safetensors")
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in fp32.items())
    assert json.loads((make_tiny("qwen3", dtype="bfloat16") / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_small_config_has_qwen25_05b_shape():
    ids = {t: i for i, t in enumerate(mm.FAMILIES["qwen3"].control_tokens + mm.FAMILIES["qwen3"].text_tokens)}
    config = mm._model_config("qwen3", "small", 8000, ids)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings, config.head_dim) == \
        (896, 24, 14, 2, 4864, 151936, 32768, 64)
    assert config.tie_word_embeddings


def test_default_model_path_is_made_once_and_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ANYSERVE_CACHE", str(tmp_path))
    calls = []
    real = mm.make_model
    monkeypatch.setattr(mm, "make_model", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    with caplog.at_level(logging.WARNING, logger=mm.__name__):
        paths = [mm.default_model_path(), mm.default_model_path()]
    assert paths[0] == paths[1] == tmp_path / "demo-llama-tiny" and len(calls) == 1
    assert "RANDOM" in caplog.text
    assert AutoTokenizer.from_pretrained(paths[0]).bos_token == "<|begin_of_text|>"
    assert [p.name for p in tmp_path.iterdir()] == ["demo-llama-tiny"]  # no temp folders left


def test_default_model_path_survives_a_race_and_rebuilds_stale_models(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSERVE_CACHE", str(tmp_path))
    results = []
    threads = [threading.Thread(target=lambda: results.append(mm.default_model_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == ["demo-llama-tiny"]
    marker = results[0] / mm.MARKER_FILE
    marker.write_text(json.dumps({"version": -1}))
    assert mm.default_model_path() == results[0] and mm._is_current(results[0])


def test_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        mm.make_model("llama", "tiny", tmp_path)
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        mm.make_model("gpt2", "tiny", tmp_path / "x")
    with pytest.raises(ValueError, match="'mistral_v11' for llama"):
        mm.make_model("llama", "tiny", tmp_path / "y", chat="mistral_v11")


def test_mistral_v11_chat_has_the_args_token_and_renders_it(make_tiny):
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(str(make_tiny("mistral", chat="mistral_v11")))
    added = tok.get_added_vocab()
    assert {"[ARGS]", "[CALL_ID]", "[TOOL_CALLS]"} <= added.keys()
    assert tok.encode("[ARGS]", add_special_tokens=False) == [added["[ARGS]"]]
    call = {"id": "a1B2c3D4e", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": None, "tool_calls": [call]}], tokenize=False)
    assert text.endswith('[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{"x": 1}</s>')


def test_cli_flags_reach_make_model(tmp_path):
    parser = argparse.ArgumentParser()
    mm.add_make_model_args(parser)
    args = parser.parse_args(["--arch", "qwen2", "--dtype", "bfloat16", "--seed", "3", "--num-shards", "2",
                              str(tmp_path / "out")])
    out = mm.run_make_model(args)
    made = json.loads((out / mm.MARKER_FILE).read_text())
    assert (made["arch"], made["size"], made["dtype"], made["seed"], made["num_shards"]) == \
        ("qwen2", "tiny", "bfloat16", 3, 2)
    assert len(list(out.glob("*.safetensors"))) == 2
