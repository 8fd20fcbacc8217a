"""The model library against Hugging Face transformers on the same tiny random checkpoints (the
suite's shared ones, and variants made here that the shared maker does not offer):
logits, greedy tokens (alone and batched), extend after a cached prefix, rope scalings, tied
embeddings, bf16, dummy and sharded loading, tensor parallelism, and the loader's errors."""
from __future__ import annotations

import json
import threading

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.layers import parallel_state
from engine.models.config import ModelConfig, UnsupportedModelError
from engine.runner.model_loader import WeightLoadError, load_model
from hal.collectives import Collectives
from model_harness import ModelHarness

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05)
ARCH_EXTRA = {"qwen3": dict(head_dim=32)}  # explicit head_dim != hidden / heads


def make_checkpoint(path, arch: str, seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny random HF model of ``arch`` at ``path``; norms and biases random too."""
    cfg_cls, model_cls = HF_CLASSES[arch]
    torch.manual_seed(seed)
    hf = model_cls(cfg_cls(**{**TINY, **ARCH_EXTRA.get(arch, {}), **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(str(path), **kw)
    return hf


def load(path, dtype: str = "float32", **kw):
    cfg = ModelConfig.from_pretrained(str(path), dtype=dtype, **kw)
    return cfg, load_model(cfg, "auto", "cpu")


def prompts(n: int, lens, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY["vocab_size"], (lens[i % len(lens)],), generator=g).tolist() for i in range(n)]


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_generate(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_logits_close(ours, ref, rel: float = 1e-4):
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, atol=rel * scale, rtol=0)


def hf_from_pretrained(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@pytest.fixture(scope="module")
def arch_ckpt(tiny_model):
    """The suite's tiny checkpoint of each family (tests/conftest.py), as HF and as ours."""
    arch, path = tiny_model
    cfg, model = load(path)
    return arch, path, hf_from_pretrained(path), cfg, model


# ---- numbers vs transformers ------------------------------------------------------------------
def test_prefill_logits_match_hf(arch_ckpt):
    _, _, hf, cfg, model = arch_ckpt
    ids = prompts(1, [37])[0]
    ours = ModelHarness(model, page_size=4).extend([0], [ids], all_logits=True)
    assert ours.dtype == torch.float32 and ours.shape == (37, cfg.vocab_size)
    assert_logits_close(ours, hf_logits(hf, ids))


def test_greedy_32_tokens_identical_to_hf_generate(arch_ckpt):
    _, _, hf, cfg, model = arch_ckpt
    ids = prompts(1, [12], seed=1)[0]
    ours = ModelHarness(model).generate_greedy([ids], 32, eos_ids=cfg.eos_token_ids)[0]
    assert len(set(ours)) > 1  # not one token repeated
    assert ours == hf_generate(hf, ids, 32)


def test_batched_mixed_lengths_each_match_hf_alone(arch_ckpt):
    _, _, hf, cfg, model = arch_ckpt
    batch = prompts(4, [5, 23, 1, 14], seed=2)
    outs = ModelHarness(model, page_size=4).generate_greedy(batch, 32, eos_ids=cfg.eos_token_ids)
    for ids, ours in zip(batch, outs):
        assert ours == hf_generate(hf, ids, 32)


def test_untied_random_norms_and_biases_match_hf(tmp_path):
    """Our own checkpoint: untied head, every norm weight and q/k/v bias random."""
    hf = make_checkpoint(tmp_path, "qwen2")
    cfg, model = load(tmp_path)
    assert not cfg.tie_word_embeddings and cfg.qkv_bias
    ids = prompts(1, [33], seed=10)[0]
    assert_logits_close(ModelHarness(model).extend([0], [ids], all_logits=True), hf_logits(hf, ids))


def test_extend_after_cached_prefix_equals_one_shot(arch_ckpt):
    _, _, _, _, model = arch_ckpt
    batch = prompts(3, [20, 9, 30], seed=3)
    one_shot = ModelHarness(model, page_size=16)
    full = [one_shot.extend([i], [p], all_logits=True) for i, p in enumerate(batch)]
    split = ModelHarness(model, page_size=16)
    split.extend([0, 1, 2], [p[:7] for p in batch])
    second = split.extend([0, 1, 2], [p[7:] for p in batch], all_logits=True)
    assert_logits_close(second, torch.cat([f[7:] for f in full]), rel=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "dynamic", "factor": 2.0},
], ids=lambda r: r["rope_type"])
def test_rope_scaling_matches_hf(tmp_path, rope):
    hf = make_checkpoint(tmp_path, "llama", rope_parameters={"rope_theta": 10000.0, **rope})
    cfg, model = load(tmp_path)
    assert cfg.rope_type == rope["rope_type"]
    ids = prompts(1, [200], seed=4)[0]
    assert_logits_close(ModelHarness(model).extend([0], [ids], all_logits=True), hf_logits(hf, ids))


def test_legacy_rope_scaling_field_is_read(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg_file = tmp_path / "config.json"
    hf_cfg = json.loads(cfg_file.read_text())
    hf_cfg.pop("rope_parameters")
    hf_cfg.update(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg_file.write_text(json.dumps(hf_cfg))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_tied_embeddings(tmp_path):
    hf = make_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    cfg, model = load(tmp_path)
    assert cfg.tie_word_embeddings and model.lm_head is model.model.embed_tokens
    ids = prompts(1, [25], seed=5)[0]
    assert_logits_close(ModelHarness(model).extend([0], [ids], all_logits=True), hf_logits(hf, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_logits_within_bf16_tolerance(make_tiny, arch):
    path = make_tiny(arch)
    hf = hf_from_pretrained(path)
    cfg, model = load(path, dtype="bfloat16")
    assert cfg.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    ids = prompts(1, [30], seed=6)[0]
    ours = ModelHarness(model).extend([0], [ids], all_logits=True)
    assert ours.dtype == torch.float32
    assert_logits_close(ours, hf_logits(hf, ids), rel=5e-2)
    assert_logits_close(ours, hf_logits(hf.to(torch.bfloat16), ids), rel=3e-2)


# ---- loading ------------------------------------------------------------------------------------
def test_dummy_load_has_checkpoint_shapes_and_reads_no_file(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    real_cfg, real = load(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="float32")
    dummy = load_model(cfg, "dummy", "cpu")
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in dummy.named_parameters()} == shapes
    assert torch.all(dummy.model.norm.weight == 1)
    logits = ModelHarness(dummy).extend([0, 1], [[5, 6, 7], [8, 9]])
    assert logits.shape == (2, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_sharded_checkpoint_loads_and_logs_a_summary(make_tiny, caplog):
    path = make_tiny("qwen3", num_shards=3)
    hf = hf_from_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    shards = len(list(path.glob("*.safetensors")))
    assert shards == 3
    with caplog.at_level("INFO", logger="engine.runner.model_loader"):
        _, model = load(path)
    assert f"from {shards} safetensors file(s)" in caplog.text
    ids = prompts(1, [16], seed=7)[0]
    assert_logits_close(ModelHarness(model).extend([0], [ids], all_logits=True), hf_logits(hf, ids))


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_no_safetensors_is_a_clear_error(tmp_path):
    make_checkpoint(tmp_path, "llama")
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors.*dummy"):
        load(tmp_path)


def test_shape_mismatch_names_both_shapes(tmp_path):
    make_checkpoint(tmp_path, "llama")
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:100]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"up_proj.*\(100, 64\).*\(128, 64\)"):
        load(tmp_path)


def test_missing_weight_is_named(tmp_path):
    make_checkpoint(tmp_path, "llama")
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match="model.layers.0.self_attn.qkv_proj.weight"):
        load(tmp_path)


def test_architecture_from_model_type_when_architectures_absent(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architectures": None}))
    assert ModelConfig.from_pretrained(str(tmp_path)).architecture == "Qwen2ForCausalLM"


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_pretrained(str(tmp_path))


# ---- config ---------------------------------------------------------------------------------------
def test_eos_ids_from_generation_config_list_or_int(tmp_path):
    make_checkpoint(tmp_path, "llama")
    assert ModelConfig.from_pretrained(str(tmp_path)).eos_token_ids == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.from_pretrained(str(tmp_path)).eos_token_ids == [7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert ModelConfig.from_pretrained(str(tmp_path)).eos_token_ids == [11]


def test_mistral_sliding_window_on_every_layer_at_full_context(tmp_path):
    make_checkpoint(tmp_path, "mistral", sliding_window=64)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.layer_sliding_windows == (64, 64) and cfg.sliding_windows == (64,)
    assert cfg.sliding_window_of(1) == 64 and cfg.context_len == 512      # not capped to the window
    assert ModelConfig.from_pretrained(str(tmp_path), context_length=32).context_len == 32


def test_qwen2_window_ignored_without_use_sliding_window(tmp_path):
    make_checkpoint(tmp_path, "qwen2", sliding_window=64, use_sliding_window=False)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.sliding_windows == () and cfg.sliding_window_of(0) is None and cfg.context_len == 512


def rewrite_config(path, **edits):
    """config.json with ``edits`` (None: the key removed)."""
    config = {**json.loads((path / "config.json").read_text()), **edits}
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_qwen2_windows_follow_max_window_layers_or_layer_types(tmp_path):
    """As transformers reads them: with use_sliding_window, layers >= max_window_layers slide unless
    layer_types names each layer's kind; a Llama config's window is never used."""
    make_checkpoint(tmp_path, "qwen2")
    rewrite_config(tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None)
    assert ModelConfig.from_pretrained(str(tmp_path)).layer_sliding_windows == (None, 16)
    rewrite_config(tmp_path, max_window_layers=0)
    assert ModelConfig.from_pretrained(str(tmp_path)).layer_sliding_windows == (16, 16)
    rewrite_config(tmp_path, layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_pretrained(str(tmp_path)).layer_sliding_windows == (16, None)
    rewrite_config(tmp_path, layer_types=["full_attention"] * 2)
    assert ModelConfig.from_pretrained(str(tmp_path)).sliding_windows == ()
    rewrite_config(tmp_path, layer_types=["sliding_attention"])
    with pytest.raises(UnsupportedModelError, match="layer_types names 1 layers, the model has 2"):
        ModelConfig.from_pretrained(str(tmp_path))
    make_checkpoint(tmp_path, "llama")
    rewrite_config(tmp_path, sliding_window=16, use_sliding_window=True)
    assert ModelConfig.from_pretrained(str(tmp_path)).sliding_windows == ()


def test_dtype_auto_follows_checkpoint_if_platform_supports_it(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "dtype": "bfloat16"}))
    assert ModelConfig.from_pretrained(str(tmp_path)).dtype == torch.bfloat16
    only_fp32 = ModelConfig.from_pretrained(str(tmp_path), platform_dtypes=(torch.float32,),
                                            platform_default=torch.float32)
    assert only_fp32.dtype == torch.float32
    assert ModelConfig.from_pretrained(str(tmp_path), dtype="float16").dtype == torch.float16


# ---- tensor parallelism ---------------------------------------------------------------------------
class ThreadCollectives(Collectives):
    """Ranks as threads of one process, exchanging tensors through shared slots."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.slots, self._barrier = rank, len(slots), slots, barrier

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.rank] = t
        self._barrier.wait()
        got = list(self.slots)
        self._barrier.wait()
        return got

    def all_reduce(self, t, op="sum"):
        assert op == "sum"
        return _sum(self._exchange(t))

    def all_gather(self, t, dim=-1):
        return torch.cat(self._exchange(t), dim=dim)

    def broadcast(self, t, src=0):
        return t.copy_(self._exchange(t)[src])

    def broadcast_object(self, obj, src=0):
        return obj

    def barrier(self):
        self._barrier.wait()


def _sum(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out += t
    return out


def test_tensor_parallel_4_ranks_matches_hf(tmp_path):
    """4 ranks, 2 KV heads (each replicated on 2 ranks), vocab 250 (padded to 4 x 63)."""
    hf = make_checkpoint(tmp_path, "qwen2", vocab_size=250)
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="float32")
    tp = 4
    slots, barrier = [None] * tp, threading.Barrier(tp)
    models = []
    try:
        for rank in range(tp):
            parallel_state.set_tp(rank, tp, ThreadCollectives(rank, slots, barrier))
            models.append(load_model(cfg, "auto", "cpu"))
    finally:
        parallel_state.set_tp(0, 1)
    assert models[0].model.layers[0].self_attn.num_kv_heads == 1
    ids = prompts(1, [21], seed=8)[0]
    results = [None] * tp

    def run(rank):
        h = ModelHarness(models[rank])
        results[rank] = h.extend([0], [ids], all_logits=True)
        h.decode([0], [int(results[rank][-1].argmax())])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.shape == (21, 250)
        assert_logits_close(r, hf_logits(hf, ids))
