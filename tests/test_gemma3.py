"""Gemma 3 text (Gemma3ForCausalLM) against transformers on the tiny make-model checkpoint: 4 layers
(sliding, sliding, full, sliding) with a window of 8, the local RoPE on sliding layers and the
linearly scaled global one on the full layer, an attention scale that is not head_dim ** -0.5.
Logits and greedy tokens past the window (alone, batched, chunked, through the Engine), bf16,
tensor parallelism, the config's rules and errors, and the checkpoint make-model writes."""
from __future__ import annotations

import json
import random
import shutil
import threading

import pytest
import torch
from transformers import AutoTokenizer

from engine import Engine
from engine.layers import parallel_state
from engine.models import make_model as mm
from engine.models.config import ModelConfig, UnsupportedModelError
from engine.runner.model_loader import load_model
from hf_reference import hf_greedy, hf_model
from model_harness import ModelHarness
from test_models_vs_hf import ThreadCollectives, assert_logits_close, hf_logits

WINDOW = 8
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def gemma(make_tiny):
    """(checkpoint path, transformers model, our ModelConfig and model), float32."""
    path = make_tiny("gemma3")
    cfg = ModelConfig.from_pretrained(str(path), dtype="float32")
    return path, hf_model(path), cfg, load_model(cfg, "auto", "cpu")


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, 2000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ---- config ---------------------------------------------------------------------------------------
def test_config_gives_windows_ropes_and_scale_per_layer_type(gemma):
    path, hf, cfg, model = gemma
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.layer_sliding_windows == (WINDOW, WINDOW, None, WINDOW)
    assert hf.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (cfg.rope_theta, cfg.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert (cfg.sliding_rope_theta, cfg.sliding_rope_scaling) == (1e4, None)
    assert cfg.attention_scale == pytest.approx(24 ** -0.5) and cfg.head_dim == 32
    assert cfg.tie_word_embeddings and model.lm_head is model.model.embed_tokens
    assert cfg.eos_token_ids == [1, 6]                 # <eos> and <end_of_turn>, as gemma-3-1b-it's
    attn = [layer.self_attn.attn for layer in model.model.layers]
    assert [a.sliding_window for a in attn] == [WINDOW, WINDOW, None, WINDOW]
    assert all(a.scaling == pytest.approx(24 ** -0.5) for a in attn)


def released_style_config(path, **edits):
    """config.json as gemma-3-1b-it ships it (transformers 4.50): no layer_types or rope_parameters,
    sliding_window_pattern, rope_local_base_freq, and no tie_word_embeddings key."""
    cfg = json.loads((path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters", "tie_word_embeddings", "_sliding_window_pattern"):
        cfg.pop(key, None)
    cfg.update({"sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 5e4, "rope_scaling": None,
                **edits})
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_released_config_layout_is_read_like_transformers_reads_it(make_tiny, tmp_path):
    shutil.copytree(make_tiny("gemma3"), tmp_path, dirs_exist_ok=True)
    released_style_config(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.layer_sliding_windows == (WINDOW, WINDOW, None, WINDOW) and cfg.tie_word_embeddings
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.sliding_rope_theta) == (1e6, None, 5e4)
    hf = hf_model(tmp_path)
    assert hf.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert hf.config.rope_parameters["sliding_attention"]["rope_theta"] == 5e4
    released_style_config(tmp_path, sliding_window_pattern=None, rope_scaling={"type": "linear", "factor": 8.0})
    cfg = ModelConfig.from_pretrained(str(tmp_path))     # pattern 6 by default: 4 layers all slide
    assert cfg.layer_sliding_windows == (WINDOW,) * 4 and cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}


@pytest.mark.parametrize("edits, message", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ({"hidden_activation": "gelu"}, "'gelu' is not supported for Gemma3ForCausalLM"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "multimodal Gemma 3.*Gemma3ForCausalLM"),
    ({"architectures": None, "model_type": "gemma3"}, "multimodal Gemma 3.*gemma3_text"),
])
def test_unsupported_gemma_configs_are_clear_errors(make_tiny, tmp_path, edits, message):
    shutil.copytree(make_tiny("gemma3"), tmp_path, dirs_exist_ok=True)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), **edits}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_pretrained(str(tmp_path))


def test_gelu_is_refused_for_llama_and_silu_for_gemma(make_tiny, tmp_path):
    shutil.copytree(make_tiny("llama"), tmp_path, dirs_exist_ok=True)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), "hidden_act": "gelu_pytorch_tanh"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gelu_pytorch_tanh' is not supported for LlamaForCausalLM"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_model_type_alone_names_the_architecture(make_tiny, tmp_path):
    shutil.copytree(make_tiny("gemma3"), tmp_path, dirs_exist_ok=True)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), "architectures": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_pretrained(str(tmp_path)).architecture == "Gemma3ForCausalLM"


# ---- numbers vs transformers ----------------------------------------------------------------------
def test_prefill_logits_past_the_window_match_hf(gemma):
    _, hf, cfg, model = gemma
    ids = prompts(1, 40, 40, seed=1)[0]
    ours = ModelHarness(model, page_size=4).extend([0], [ids], all_logits=True)
    assert ours.shape == (40, cfg.vocab_size)
    assert_logits_close(ours, hf_logits(hf, ids))


def test_harness_greedy_batched_and_chunked_match_hf(gemma):
    """Mixed lengths (6 to 30) decoded together, each prompt extended in two chunks."""
    _, hf, cfg, model = gemma
    batch = prompts(4, 6, 30, seed=2)
    outs = ModelHarness(model, page_size=4).generate_greedy(batch, 20, first_chunk=5)
    assert outs == [hf_greedy(hf, p, 20) for p in batch]
    assert len(set(outs[0])) > 1


def test_engine_greedy_past_the_window_alone_batched_and_chunked(gemma):
    path, hf, _, _ = gemma
    ps = prompts(4, 3, 40, seed=3)
    expected = [hf_greedy(hf, p, 16) for p in ps]
    params = {**GREEDY, "max_new_tokens": 16}
    with Engine(model_path=str(path), device="cpu", dtype="float32", page_size=2, chunked_prefill_size=12,
                enable_mixed_chunk=True) as eng:
        runner = eng.scheduler.runner
        assert f"sliding_window={WINDOW} on 3 of 4 layers" in runner.describe()
        assert eng.generate(input_ids=ps[0], sampling_params=params)["output_ids"] == expected[0]
        assert [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=params)] == expected
        eng.scheduler.check_memory_whole()


def test_bf16_logits_within_bf16_tolerance(make_tiny):
    path = make_tiny("gemma3")
    cfg = ModelConfig.from_pretrained(str(path), dtype="bfloat16")
    model = load_model(cfg, "auto", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.embed_scale(torch.bfloat16) == 8.0          # sqrt(64) is exact in bf16
    ids = prompts(1, 30, 30, seed=4)[0]
    ours = ModelHarness(model).extend([0], [ids], all_logits=True)
    assert_logits_close(ours, hf_logits(hf_model(path, torch.bfloat16), ids), rel=3e-2)
    assert_logits_close(ours, hf_logits(hf_model(path), ids), rel=5e-2)


def test_embed_scale_is_rounded_to_the_weights_dtype(gemma):
    """gemma-3-1b: sqrt(1152) = 33.94 multiplies bf16 embeddings as 34.0, as transformers does."""
    model = gemma[3].model
    model.hidden_size, scales = 1152, dict(model._embed_scales)
    try:
        model._embed_scales.clear()
        assert model.embed_scale(torch.bfloat16) == 34.0
        assert model.embed_scale(torch.float32) == pytest.approx(1152 ** 0.5)
    finally:
        model.hidden_size, model._embed_scales = 64, scales


def test_tensor_parallel_2_ranks_match_hf(gemma):
    """Heads (2 q, 1 kv per rank), the GeGLU MLP and the vocabulary split over 2 ranks (threads)."""
    path, hf, cfg, _ = gemma
    tp, slots = 2, [None, None]
    barrier = threading.Barrier(tp)
    models = []
    try:
        for rank in range(tp):
            parallel_state.set_tp(rank, tp, ThreadCollectives(rank, slots, barrier))
            models.append(load_model(cfg, "auto", "cpu"))
    finally:
        parallel_state.set_tp(0, 1)
    assert models[0].model.layers[0].self_attn.num_heads == 2
    ids = prompts(1, 20, 20, seed=5)[0]
    results = [None] * tp

    def run(rank):
        results[rank] = ModelHarness(models[rank]).extend([0], [ids], all_logits=True)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_logits_close(r, hf_logits(hf, ids))


# ---- the make-model checkpoint --------------------------------------------------------------------
def test_make_model_gemma3_tokenizer_and_chat_template(make_tiny):
    path = make_tiny("gemma3")
    tok = AutoTokenizer.from_pretrained(path)
    family = mm.FAMILIES["gemma3"]
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    for token in family.control_tokens:
        assert tok(token, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<eos>" and tok("hi").input_ids[0] == tok.bos_token_id == 2
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(Exception, match="alternate user and assistant"):
        tok.apply_chat_template(messages[1:2] * 2, tokenize=False)
    gen = json.loads((path / "generation_config.json").read_text())
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert gen["eos_token_id"] == [1, end_of_turn] and gen["pad_token_id"] == 0
    raw = json.loads((path / "config.json").read_text())
    assert raw["rope_local_base_freq"] == 1e4 and raw["rope_theta"] == 1e6 and raw["model_type"] == "gemma3_text"



def test_a_system_prompt_and_several_turns_through_the_openai_chat_route(make_tiny):
    """The chat template renders a system prompt and alternating turns inside the server, and the
    answer's prompt_tokens are the template's tokens."""
    from server_fixture import chat_once

    path = make_tiny("gemma3")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
    answer = chat_once(path, messages)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids      # a BatchEncoding in transformers 5
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["usage"]["completion_tokens"] <= 8 and answer["choices"][0]["message"]["role"] == "assistant"
