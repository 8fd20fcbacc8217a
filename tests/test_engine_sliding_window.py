"""Sliding-window models end to end on the CPU against transformers: tiny checkpoints whose
config.json gives a window of 8 (Mistral: every layer; Qwen2: only some layers, by
max_window_layers or by layer_types; the MoE families by their own rules), prompts and outputs well past the window, alone, batched,
through chunked prefill, mixed steps and radix-cache hits. Greedy tokens must be identical."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from engine import Engine
from engine.models.config import ModelConfig
from hf_reference import hf_greedy, hf_model

WINDOW = 8
GREEDY = {"temperature": 0.0, "ignore_eos": True}
# config.json edits that turn the tiny checkpoints into sliding-window models (2 layers each)
VARIANTS = {
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # transformers: layers >= max_window_layers slide, so layer 1 does and layer 0 attends to all
    "qwen2-max-window-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
                                          "max_window_layers": 1, "layer_types": None}),
    # layer_types wins over max_window_layers: layer 0 slides, layer 1 attends to all
    "qwen2-layer-types": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    # mixture-of-experts families: Mixtral as Mistral; Qwen3-MoE every layer once used; Qwen2-MoE
    # (without layer_types) the even layers below max_window_layers
    "mixtral": ("mixtral", {"sliding_window": WINDOW}),
    "qwen3_moe": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen2_moe": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
                                "layer_types": None}),
}
EXPECTED_WINDOWS = {"mistral": (WINDOW, WINDOW), "qwen2-max-window-layers": (None, WINDOW),
                    "qwen2-layer-types": (WINDOW, None), "mixtral": (WINDOW, WINDOW),
                    "qwen3_moe": (WINDOW, WINDOW), "qwen2_moe": (WINDOW, None)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def windowed(request, make_tiny, tmp_path_factory):
    """(variant name, checkpoint path, transformers model on it)."""
    arch, edits = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    shutil.copytree(make_tiny(arch), path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(edits)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return request.param, path, hf_model(path)


def prompts(n, lo, hi, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 2000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_config_gives_each_layer_its_window_and_the_full_context(windowed):
    name, path, hf = windowed
    cfg = ModelConfig.from_pretrained(str(path))
    assert cfg.layer_sliding_windows == EXPECTED_WINDOWS[name]
    assert cfg.context_len == cfg.max_position_embeddings == 2048      # not capped to the window
    # transformers reads the same windows from the same file (Mistral's layers take the config's)
    attns = [layer.self_attn for layer in hf.model.layers]
    types = getattr(hf.config, "layer_types", None)

    def hf_window(i, attn):
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return hf.config.sliding_window if types is None or types[i] == "sliding_attention" else None
    assert [hf_window(i, a) for i, a in enumerate(attns)] == list(EXPECTED_WINDOWS[name])


def test_greedy_past_the_window_matches_transformers_alone_and_batched(windowed):
    """Prompts of 3 to 40 tokens (most past the window of 8) and 24 new tokens each."""
    name, path, hf = windowed
    ps = prompts(5, 3, 40, seed=11)
    expected = [hf_greedy(hf, p, 24) for p in ps]
    params = {**GREEDY, "max_new_tokens": 24}
    with Engine(model_path=str(path), device="cpu", dtype="float32", page_size=4) as eng:
        runner = eng.scheduler.runner
        layers = sum(w is not None for w in EXPECTED_WINDOWS[name])
        assert f"sliding_window={WINDOW} on {layers} of 2 layers" in runner.describe()
        assert set(runner.attn_backend.sliding_windows) == set(EXPECTED_WINDOWS[name])
        assert eng.generate(input_ids=ps[0], sampling_params=params)["output_ids"] == expected[0]
        assert [o["output_ids"] for o in eng.generate(input_ids=ps, sampling_params=params)] == expected
        eng.scheduler.check_memory_whole()


def test_chunked_prefill_mixed_steps_and_cache_hits_past_the_window(windowed):
    """Chunks of 12 tokens (each crossing the window of 8) with running requests decoding in the
    prefill steps, then prompts sharing a 30-token prefix with earlier ones: served from the radix
    cache, whose cached KV lies partly outside the new tokens' window."""
    _, path, hf = windowed
    first = prompts(3, 20, 45, seed=12)
    again = [p[:30] + q for p, q in zip(first, prompts(3, 3, 9, seed=13))]
    params = {**GREEDY, "max_new_tokens": 16}
    with Engine(model_path=str(path), device="cpu", dtype="float32", page_size=2, chunked_prefill_size=12,
                enable_mixed_chunk=True) as eng:
        outs = eng.generate(input_ids=first, sampling_params=params)
        assert [o["output_ids"] for o in outs] == [hf_greedy(hf, p, 16) for p in first]
        for p in again:
            out = eng.generate(input_ids=p, sampling_params=params)
            assert out["meta_info"]["cached_tokens"] >= 30
            assert out["output_ids"] == hf_greedy(hf, p, 16)
        eng.scheduler.check_memory_whole()
