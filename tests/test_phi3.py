"""Phi-3 (Phi3ForCausalLM) against transformers on tiny random checkpoints in the Hub's layout (fused
qkv_proj and gate_up_proj): logits and greedy tokens through the Engine alone and batched, with
longrope (short factors in effect), default rope, partial rotary and a sliding window; the longrope
table on both sides of original_max_position_embeddings; bf16; the fused tensors' loader, its TP
slicing, dummy weights and errors; tp2 over gloo; how config.json is read."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import Engine
from engine.layers import parallel_state
from engine.layers.rotary import get_rope
from engine.models.config import ModelConfig, UnsupportedModelError
from engine.runner.model_loader import WeightLoadError, dummy_tensor, load_model
from hal.collectives import SingleProcessCollectives
from hf_reference import hf_greedy, hf_model
from model_harness import ModelHarness
from test_models_vs_hf import assert_logits_close, hf_logits
from test_tp import _generate, dummy_rank_models

GREEDY = {"temperature": 0.0, "ignore_eos": True}
HEAD_DIM = 16        # make_model's tiny: hidden 64 over 4 heads (2 KV heads)
QKV = "model.layers.1.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.0.mlp.gate_up_proj.weight"


def _factors(n: int) -> dict:
    return {"short_factor": [1.0 + 0.05 * i for i in range(n)], "long_factor": [1.0 + 0.5 * i for i in range(n)]}


def _set_rope(cfg: dict, rope: dict) -> None:
    """The same rope in both places make_model writes it (transformers 5's rope_parameters, 4's rope_scaling)."""
    cfg["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None


def _default_rope(cfg: dict) -> None:
    _set_rope(cfg, {"rope_type": "default"})


def _partial_rotary(cfg: dict) -> None:
    """Phi-4-mini's layout: a top-level 0.75 (12 of 16 dims rotate), longrope lists of 6 factors."""
    cfg["partial_rotary_factor"] = 0.75
    _set_rope(cfg, {"rope_type": "longrope", **_factors(6)})


def _window(cfg: dict) -> None:             # Phi-3-mini-4k's every-layer window, smaller than the prompts
    cfg["sliding_window"] = 8


VARIANTS = {"longrope": None, "default-rope": _default_rope, "partial-rotary": _partial_rotary, "window": _window}


def edited_copy(src, dst, edit) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    if edit is not None:
        file = dst / "config.json"
        cfg = json.loads(file.read_text())
        edit(cfg)
        file.write_text(json.dumps(cfg, indent=2))
    return str(dst)


@pytest.fixture(scope="module", params=list(VARIANTS))
def phi3(request, make_tiny, tmp_path_factory):
    """(variant, path, transformers model, our config, our fp32 model)."""
    path = edited_copy(make_tiny("phi3"), tmp_path_factory.mktemp(request.param), VARIANTS[request.param])
    cfg = ModelConfig.from_pretrained(path, dtype="float32")
    return request.param, path, hf_model(path), cfg, load_model(cfg, "auto", "cpu")


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(8, 2000, (k,), generator=g).tolist() for k in lens]


# ---- numbers vs transformers --------------------------------------------------------------------
def test_config_reads_each_variant_as_transformers_does(phi3):
    name, _, hf, cfg, _ = phi3
    assert cfg.architecture == "Phi3ForCausalLM"
    assert cfg.rope_type == ("default" if name == "default-rope" else "longrope")
    assert cfg.rotary_dim == (12 if name == "partial-rotary" else HEAD_DIM)
    assert hf.model.rotary_emb.inv_freq.numel() == cfg.rotary_dim // 2
    assert cfg.layer_sliding_windows == ((8, 8) if name == "window" else ())
    assert cfg.rope_type == "default" or cfg.rope_scaling["original_max_position_embeddings"] == 512


def test_prefill_logits_match_transformers(phi3):
    _, _, hf, cfg, model = phi3
    ids = prompts(1, 45, 45, seed=1)[0]
    ours = ModelHarness(model, page_size=4).extend([0], [ids], all_logits=True)
    assert ours.shape == (45, cfg.vocab_size)
    assert_logits_close(ours, hf_logits(hf, ids))


def test_engine_greedy_matches_transformers_alone_and_batched(phi3):
    """Prompts of 3 to 40 tokens (past the window of 8 for the window variant), 16 new tokens each."""
    _, path, hf, _, _ = phi3
    ps = prompts(4, 3, 40, seed=2)
    expected = [hf_greedy(hf, p, 16) for p in ps]
    assert len({t for e in expected for t in e}) > 4
    params = {**GREEDY, "max_new_tokens": 16}
    with Engine(model_path=path, device="cpu", dtype="float32", page_size=4) as eng:
        assert eng.generate(input_ids=ps[0], sampling_params=params)["output_ids"] == expected[0]
        assert [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=params)] == expected


def test_longrope_table_is_short_below_the_original_context_and_long_from_it(make_tiny):
    """Rows p < original_max_position_embeddings equal transformers' cos/sin for a sequence that
    stays short; rows from there on equal its cos/sin for a sequence past it (long factors), both
    scaled by the attention factor sqrt(1 + ln 4 / ln 512)."""
    path = str(make_tiny("phi3"))
    cfg = ModelConfig.from_pretrained(path, dtype="float32")
    hf_rope = hf_model(path).model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    table = get_rope(cfg.head_dim, cfg)

    def ours(pos):
        cos, sin = table.cos_sin(pos, torch.float32)           # [n, 1, 8] each
        return torch.cat((cos, cos), -1)[:, 0], torch.cat((sin, sin), -1)[:, 0]

    short = torch.arange(512)
    ref_cos, ref_sin = hf_rope(x, short[None])
    assert hf_rope.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4) / math.log(512)))
    torch.testing.assert_close(ours(short), (ref_cos[0], ref_sin[0]), atol=0, rtol=0)
    longer = torch.arange(600)
    ref_cos, ref_sin = hf_rope(x, longer[None])
    got_cos, got_sin = ours(longer)
    torch.testing.assert_close((got_cos[512:], got_sin[512:]), (ref_cos[0, 512:], ref_sin[0, 512:]), atol=0, rtol=0)
    assert not torch.allclose(got_cos[:512], ref_cos[0, :512])     # transformers re-rotates the whole sequence


def test_bf16_logits_stay_close_to_transformers(make_tiny):
    path = str(make_tiny("phi3"))
    cfg = ModelConfig.from_pretrained(path, dtype="bfloat16")
    model = load_model(cfg, "auto", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = prompts(1, 30, 30, seed=3)[0]
    ours = ModelHarness(model).extend([0], [ids], all_logits=True)
    ref = hf_logits(hf_model(path), ids)
    assert ((ours - ref).abs().max(dim=-1).values / ref.abs().max()).max() < 5e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


# ---- the fused checkpoint tensors ---------------------------------------------------------------
def _rank_models(path: str, tp: int) -> list:
    cfg = ModelConfig.from_pretrained(path, dtype="float32")
    models = []
    try:
        for rank in range(tp):
            parallel_state.set_tp(rank, tp, SingleProcessCollectives())
            models.append(load_model(cfg, "auto", "cpu"))
    finally:
        parallel_state.set_tp(0, 1)
    return models


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_takes_its_heads_and_rows_of_the_fused_tensors(make_tiny, tp):
    """q heads split, 2 KV heads split at tp 2 and replicated at tp 4 (ranks 0, 1 share KV head 0),
    and each rank's [gate | up] is its rows of gate then of up."""
    path = str(make_tiny("phi3"))
    tensors = load_file(f"{path}/model.safetensors")
    q, k, v = tensors[QKV].split([64, 32, 32])
    gate, up = tensors[GATE_UP].chunk(2)
    for rank, m in enumerate(_rank_models(path, tp)):
        nq, nkv = 64 // tp, 16     # one KV head of 16 rows per rank
        kv = rank * 2 // tp
        rq, rk, rv = m.get_parameter(QKV).split([nq, nkv, nkv])
        assert torch.equal(rq, q[rank * nq:(rank + 1) * nq])
        assert torch.equal(rk, k[kv * 16:(kv + 1) * 16]) and torch.equal(rv, v[kv * 16:(kv + 1) * 16])
        rows = 128 // tp
        rg, ru = m.get_parameter(GATE_UP).chunk(2)
        mine = slice(rank * rows, (rank + 1) * rows)
        assert torch.equal(rg, gate[mine]) and torch.equal(ru, up[mine])


def test_split_q_k_v_and_gate_up_tensors_load_like_the_fused_ones(make_tiny, tmp_path):
    path = edited_copy(make_tiny("phi3"), tmp_path, None)
    fused = load_model(ModelConfig.from_pretrained(path, dtype="float32"), "auto", "cpu")
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    for name in [n for n in tensors if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
        t = tensors.pop(name)
        if "qkv" in name:
            for part, piece in zip("qkv", t.split([64, 32, 32])):
                tensors[name.replace("qkv_proj", f"{part}_proj")] = piece.contiguous()
        else:
            for part, piece in zip(("gate", "up"), t.chunk(2)):
                tensors[name.replace("gate_up_proj", f"{part}_proj")] = piece.contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    split = load_model(ModelConfig.from_pretrained(path, dtype="float32"), "auto", "cpu")
    for name, p in fused.named_parameters():
        assert torch.equal(split.get_parameter(name), p), name


@pytest.mark.parametrize("name, rows, expected", [(QKV, 100, "fused qkv linear.*(100, 64).*(128, 64)"),
                                                  (GATE_UP, 200, "fused merged linear.*(200, 64).*(256, 64)")])
def test_a_fused_tensor_of_the_wrong_shape_is_named(make_tiny, tmp_path, name, rows, expected):
    path = edited_copy(make_tiny("phi3"), tmp_path, None)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    tensors[name] = tensors[name][:rows].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    pattern = re.escape(name) + ": " + expected.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(WeightLoadError, match=pattern):
        load_model(ModelConfig.from_pretrained(path), "auto", "cpu")


def test_dummy_weights_draw_the_fused_tensors_and_split_them_over_ranks(make_tiny):
    """--load-format dummy draws qkv_proj and gate_up_proj whole, as the checkpoint holds them (one
    shard id each), so the tp2 ranks' shards are the tp1 model's slices."""
    cfg = ModelConfig.from_pretrained(str(make_tiny("phi3")), dtype="float32")
    one = load_model(cfg, "dummy", "cpu")
    assert torch.equal(one.get_parameter(QKV), dummy_tensor(QKV, None, (128, 64), torch.float32, "cpu"))
    assert torch.equal(one.get_parameter(GATE_UP), dummy_tensor(GATE_UP, None, (256, 64), torch.float32, "cpu"))
    two = dummy_rank_models(cfg, 2)
    for name, p in one.named_parameters():
        shards = [m.get_parameter(name) for m in two]
        if "norm" in name:
            assert all(torch.equal(s, p) for s in shards), name
        elif "o_proj" in name or "down_proj" in name:
            assert torch.equal(torch.cat(shards, dim=1), p), name
        elif "gate_up" in name:
            parts = [s.chunk(2) for s in shards]
            assert torch.equal(torch.cat([h[0] for h in parts] + [h[1] for h in parts]), p), name
        elif "qkv" in name:
            parts = [s.split([32, 16, 16]) for s in shards]
            assert torch.equal(torch.cat([h[i] for i in range(3) for h in parts]), p), name
        else:   # embed_tokens, lm_head: vocab rows
            assert torch.equal(torch.cat(shards)[:cfg.vocab_size], p), name


def test_tp2_greedy_tokens_equal_tp1_with_partial_rotary(make_tiny, tmp_path):
    """Over gloo, from two safetensors shards read lazily (each rank reads its rows of the fused tensors)."""
    path = edited_copy(make_tiny("phi3", num_shards=2), tmp_path, _partial_rotary)
    one = _generate(path, 1, max_new_tokens=12)
    assert all(len(v) == 12 for v in one.values())
    assert _generate(path, 2, max_new_tokens=12) == one


# ---- config.json --------------------------------------------------------------------------------
def _config_with(make_tiny, tmp_path, edit) -> ModelConfig:
    return ModelConfig.from_pretrained(edited_copy(make_tiny("phi3"), tmp_path, edit))


def test_su_and_released_layouts_read_as_longrope(make_tiny, tmp_path):
    """Early Phi-3-128k configs say "su"; released ones give longrope in rope_scaling with "type" and
    original_max_position_embeddings only at the top level, which transformers prefers."""
    def released(cfg):
        cfg.pop("rope_parameters")
        cfg["rope_scaling"] = {"type": "su", **_factors(8), "original_max_position_embeddings": 99}
        cfg["original_max_position_embeddings"] = 256
    cfg = _config_with(make_tiny, tmp_path, released)
    assert cfg.rope_type == "longrope" and cfg.rope_scaling["original_max_position_embeddings"] == 256
    assert "type" not in cfg.rope_scaling


def _rotary_factor(value: float):
    """An edit setting partial_rotary_factor where make_model writes it (inside the rope dicts, which
    win over a top-level one in transformers too)."""
    def edit(cfg):
        for key in ("rope_parameters", "rope_scaling"):
            cfg[key]["partial_rotary_factor"] = value
    return edit


def test_bad_partial_rotary_and_factor_lists_are_refused(make_tiny, tmp_path):
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.1 gives 1 rotary dims"):
        _config_with(make_tiny, tmp_path / "a", _rotary_factor(0.1))
    cfg = _config_with(make_tiny, tmp_path / "b", _rotary_factor(0.5))
    with pytest.raises(ValueError, match="longrope short_factor has 8 entries; the 8 rotary dims need 4"):
        load_model(cfg, "dummy", "cpu")
    with pytest.raises(UnsupportedModelError, match="longrope needs rope_scaling long_factor"):
        _config_with(make_tiny, tmp_path / "c",
                     lambda c: _set_rope(c, {"rope_type": "longrope", "short_factor": [1.0] * 8}))


# the keys of released config.json files that matter here (factor lists abbreviated to a ramp)
_RELEASED = {
    "Phi-3-mini-4k": dict(max_position_embeddings=4096, rope_scaling=None, sliding_window=2047),
    "Phi-3.5-mini": dict(max_position_embeddings=131072, sliding_window=262144, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(48)],
        "long_factor": [1.0 + 1.5 * i for i in range(48)]}),
    "Phi-4-mini": dict(max_position_embeddings=131072, sliding_window=262144, num_attention_heads=24,
                       num_key_value_heads=8, partial_rotary_factor=0.75, vocab_size=200064,
                       tie_word_embeddings=True, rope_scaling={
                           "type": "longrope", "short_factor": [1.0 + 0.03 * i for i in range(48)],
                           "long_factor": [1.0 + 1.2 * i for i in range(48)]}),
}


@pytest.mark.parametrize("name", list(_RELEASED))
def test_released_configs_give_transformers_rope_and_windows(tmp_path, name):
    """Rotary tables of Phi-3-mini-4k, Phi-3.5-mini and Phi-4-mini configs against transformers'
    rotary embedding on the same config.json: short factors below position 4096, long ones after."""
    raw = {**dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                  original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000), **_RELEASED[name]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(str(tmp_path), context_length=4200)
    # Phi-3-mini-4k's window slides within the 4,200-token context; the others' (262,144) cannot
    assert cfg.layer_sliding_windows == ((2047,) * 32 if name == "Phi-3-mini-4k" else ())
    assert cfg.rotary_dim == 96 and cfg.head_dim == (128 if name == "Phi-4-mini" else 96)
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    hf_rope = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(hf_config)
    x = torch.zeros(1)
    cos, sin = get_rope(cfg.head_dim, cfg).cos_sin(torch.arange(4200), torch.float32)     # [4200, 1, 48]
    for positions, rows in ((torch.arange(4096), slice(0, 4096)), (torch.arange(4200), slice(4096, 4200))):
        ref_cos, ref_sin = hf_rope(x, positions[None])                                    # [1, n, 96]
        torch.testing.assert_close(cos[rows, 0], ref_cos[0, rows, :48], atol=0, rtol=0)
        torch.testing.assert_close(sin[rows, 0], ref_sin[0, rows, :48], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["PhiMoEForCausalLM", "Phi3VForCausalLM"])
def test_other_phi_architectures_stay_unsupported(make_tiny, tmp_path, arch):
    with pytest.raises(UnsupportedModelError, match=f"architecture \\['{arch}'\\] is not supported"):
        _config_with(make_tiny, tmp_path, lambda c: c.update(architectures=[arch]))


# ---- make_model ---------------------------------------------------------------------------------
def test_make_model_writes_the_hub_layout_and_phi35_chat_family(make_tiny):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from test_make_model import _greedy

    path = make_tiny("phi3")
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["Phi3ForCausalLM"] and raw["rope_scaling"]["rope_type"] == "longrope"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {QKV, GATE_UP} <= names and not any("q_proj" in n or ".gate_proj" in n for n in names)
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|system|>\nBe kind.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    answered = messages + [{"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(answered, tokenize=False).endswith("<|assistant|>\nHello.<|end|>\n<|endoftext|>")
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        assert len(tok(token, add_special_tokens=False).input_ids) == 1, token
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|assistant|>", "<|endoftext|>")]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == stops
    assert ModelConfig.from_pretrained(str(path)).eos_token_ids == stops
    assert tok.eos_token == "<|endoftext|>" and tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids
    gaps = []
    for prompt in ["Dear Tomas,", "def fibonacci(n):"]:
        _, logits = _greedy(hf_model(path), tok(prompt).input_ids, steps=12)
        top2 = logits.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    assert torch.cat(gaps).min() > 5e-4      # far from fp32 ties: token comparisons are stable


def test_a_system_prompt_and_several_turns_through_the_openai_chat_route(make_tiny):
    """The chat template renders a system prompt and alternating turns inside the server, and the
    answer's prompt_tokens are the template's tokens."""
    from server_fixture import chat_once

    path = make_tiny("phi3")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
    answer = chat_once(path, messages)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids      # a BatchEncoding in transformers 5
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["usage"]["completion_tokens"] <= 8 and answer["choices"][0]["message"]["role"] == "assistant"
