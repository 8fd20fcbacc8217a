"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers on the same tiny
random checkpoints: the reference fused_moe against a per-token loop, routing against transformers'
routers, logits and greedy tokens (alone, batched, chunked), bf16, both checkpoint layouts of the
experts, dummy weights, tensor parallelism, and graphs kept off while fused_moe is not graph-safe."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from backends.cpu.torch_layer_ops import TorchLayerOps
from engine import Engine
from engine.layers.moe import FusedMoE, select_experts
from engine.models.config import ModelConfig, UnsupportedModelError
from engine.models.make_model import MOE_ARCHS, make_model
from engine.models.moe import SparseMoeBlock
from engine.runner.model_loader import dummy_tensor, load_model
from hf_reference import hf_greedy, hf_model
from model_harness import ModelHarness
from test_graph_runner import GraphCpuPlatform, fake_graphs, make_runner  # noqa: F401  (fixture)
from test_make_model import _greedy
from test_models_vs_hf import assert_logits_close, hf_logits, prompts
from test_tp import dummy_rank_models

GREEDY = {"temperature": 0.0, "ignore_eos": True}
HF_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_ckpt(request, make_tiny):
    """(arch, path, transformers model, our config, our fp32 model) of each MoE arch's tiny checkpoint."""
    path = make_tiny(request.param)
    cfg = ModelConfig.from_pretrained(str(path), dtype="float32")
    return request.param, path, hf_model(path), cfg, load_model(cfg, "auto", "cpu")


# ---- the reference fused_moe and the router --------------------------------------------------------------
def per_token_moe(x, w13, w2, topk_weights, topk_ids):
    """fused_moe's contract, one token and one chosen expert at a time."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = F.linear(x[t], w13[e]).chunk(2)
            y = F.linear(F.silu(gate) * up, w2[e])                    # rounded to x's dtype
            out[t] += float(topk_weights[t, j]) * y.float()
    return out.to(x.dtype)


@pytest.mark.parametrize("tokens, experts, top_k, used", [
    (0, 4, 2, None), (1, 4, 2, None), (1, 8, 1, None), (7, 8, 1, None),
    (13, 8, 2, [1, 5, 6]),           # experts 0, 2, 3, 4, 7 get no token
    (33, 6, 3, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_fused_moe_equals_a_per_token_loop(tokens, experts, top_k, used, dtype):
    g = torch.Generator().manual_seed(tokens * 100 + experts * 10 + top_k)
    hidden, inter = 32, 24
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    pool = torch.tensor(used if used is not None else range(experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, top_k, dtype=torch.int64)
    weights = torch.rand(tokens, top_k, generator=g)
    got = TorchLayerOps().fused_moe(x, w13, w2, weights, ids.to(torch.int32))
    assert got.shape == (tokens, hidden) and got.dtype == dtype
    want = per_token_moe(x, w13, w2, weights, ids)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    if tokens and dtype == torch.float32:
        assert got.abs().max() > 0.1


def _hf_router(arch: str, experts: int, top_k: int, norm_topk_prob: bool):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    common = dict(hidden_size=32, num_experts_per_tok=top_k)
    if arch == "mixtral":
        return MixtralTopKRouter(transformers.MixtralConfig(**common, num_local_experts=experts))
    cls, cfg = ((Qwen2MoeTopKRouter, transformers.Qwen2MoeConfig) if arch == "qwen2_moe"
                else (Qwen3MoeTopKRouter, transformers.Qwen3MoeConfig))
    return cls(cfg(**common, num_experts=experts, norm_topk_prob=norm_topk_prob))


@pytest.mark.parametrize("arch, renormalize", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True),
                                               ("qwen3_moe", False), ("qwen3_moe", True)])
def test_routing_equals_transformers_router(arch, renormalize):
    g = torch.Generator().manual_seed(3)
    router = _hf_router(arch, experts=8, top_k=3, norm_topk_prob=renormalize)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) / 32 ** 0.5)   # logits ~ N(0, 1)
        h = torch.randn(50, 32, generator=g)
        logits, want_weights, want_ids = router(h)
    weights, ids = select_experts(logits, 3, renormalize)
    assert weights.dtype == torch.float32 and torch.equal(ids, want_ids)
    assert torch.equal(weights, want_weights.float())
    sums = weights.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(50))
    else:
        assert (sums < 0.99).all()         # the top 3 of 8 probabilities, as they are


# ---- the models against transformers ---------------------------------------------------------------------
def test_prefill_logits_match_transformers(moe_ckpt):
    arch, _, hf, cfg, model = moe_ckpt
    assert cfg.architecture == HF_ARCH[arch] and cfg.is_moe and cfg.num_experts == 8
    assert isinstance(model.model.layers[0].mlp, SparseMoeBlock)
    assert (model.model.layers[0].mlp.shared_expert is not None) == (arch == "qwen2_moe")
    ids = prompts(1, [37])[0]
    ours = ModelHarness(model, page_size=4).extend([0], [ids], all_logits=True)
    assert_logits_close(ours, hf_logits(hf, ids))


def test_engine_greedy_matches_transformers_alone_batched_and_chunked(moe_ckpt):
    """Through the scheduler: one request, then a batch of mixed lengths in which a 70-token prompt
    is prefilled in chunks of 32."""
    _, path, hf, cfg, _ = moe_ckpt
    batch = prompts(5, [3, 19, 70, 1, 41], seed=11)
    with Engine(model_path=str(path), device="cpu", dtype="float32", chunked_prefill_size=32) as eng:
        alone = eng.generate(input_ids=batch[2], sampling_params={**GREEDY, "max_new_tokens": 24})
        assert alone["output_ids"] == hf_greedy(hf, batch[2], 24)
        outs = eng.generate(input_ids=batch, sampling_params={**GREEDY, "max_new_tokens": 24})
        for ids, out in zip(batch, outs):
            assert out["output_ids"] == hf_greedy(hf, ids, 24)
        assert len({t for o in outs for t in o["output_ids"]}) > 10
        eng.scheduler.check_memory_whole()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_bf16_logits_stay_close_to_transformers(make_tiny, arch):
    """In bf16 a token whose router scores nearly tie may pick another expert than fp32 does (and than
    transformers' bf16, which rounds differently), and then its logits differ by more than rounding: so
    nearly every position, not every one, is within bf16 tolerance of transformers in fp32."""
    path = make_tiny(arch)
    hf = hf_model(path)
    cfg = ModelConfig.from_pretrained(str(path), dtype="bfloat16")
    model = load_model(cfg, "auto", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = prompts(1, [30], seed=6)[0]
    ours = ModelHarness(model).extend([0], [ids], all_logits=True)
    ref = hf_logits(hf, ids)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    row_err = (ours - ref).abs().max(dim=-1).values / ref.abs().max()      # [30]
    assert (row_err > 5e-2).sum() <= 2 and row_err.median() < 2e-2, row_err
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    tokens = ModelHarness(model).generate_greedy([ids], 8)[0]
    assert len(tokens) == 8 and max(tokens) < cfg.vocab_size


# ---- layouts and variants that make_model does not write ------------------------------------------------
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
VARIANTS = {
    # dense: layers 0 and 2 (decoder_sparse_step 2) and 1 (mlp_only_layers)
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   head_dim=32, norm_topk_prob=False, decoder_sparse_step=2,
                                                   mlp_only_layers=[1])),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=80, norm_topk_prob=True,
                                                   mlp_only_layers=[0])),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=5, num_experts_per_tok=2)),
}


def _hf_checkpoint(path, arch: str, fused_experts: bool = False):
    """A random transformers model of VARIANTS[arch] saved at ``path``: per-expert tensors as
    save_pretrained writes them, or (``fused_experts``) the 3-D ``experts.gate_up_proj`` /
    ``experts.down_proj`` of transformers' module layout."""
    cfg_cls, kw = VARIANTS[arch]
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(cfg_cls(**TINY, **kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    hf.save_pretrained(str(path))
    if fused_experts:
        (path / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert any(k.endswith("experts.gate_up_proj") for k in state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("arch, fused", [("qwen3_moe", False), ("qwen2_moe", True), ("mixtral", True)])
def test_sparse_and_dense_layers_and_fused_expert_checkpoints_match_transformers(tmp_path, arch, fused):
    hf = _hf_checkpoint(tmp_path, arch, fused_experts=fused)
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="float32")
    model = load_model(cfg, "auto", "cpu")
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert sparse == {"qwen3_moe": [False, False, False, True], "qwen2_moe": [False, True, True, True],
                      "mixtral": [True] * 4}[arch]
    ids = prompts(1, [29], seed=12)[0]
    assert_logits_close(ModelHarness(model).extend([0], [ids], all_logits=True), hf_logits(hf, ids))
    assert ModelHarness(model).generate_greedy([ids], 16, eos_ids=[])[0] == hf_greedy(hf, ids, 16)


def test_qwen3_moe_num_experts_under_either_name(tmp_path):
    """transformers 5 saves Qwen3-MoE's num_experts as num_local_experts; released configs say num_experts."""
    _hf_checkpoint(tmp_path, "qwen3_moe")
    cfg_file = tmp_path / "config.json"
    raw = json.loads(cfg_file.read_text())
    assert ModelConfig.from_pretrained(str(tmp_path)).num_experts == 6
    raw["num_experts"] = raw.pop("num_local_experts", None) or raw["num_experts"]
    cfg_file.write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.qk_norm) == (6, 2, 32, True)
    raw["num_experts_per_tok"] = 7
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match=r"num_experts_per_tok must be in \[1, 6\].*got 7"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_expert_shape_mismatch_is_named(tmp_path):
    from safetensors.torch import load_file

    from engine.runner.model_loader import WeightLoadError

    _hf_checkpoint(tmp_path, "mixtral")
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    tensors[name] = tensors[name][:50]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"experts\.3\.w3.*expert 3 w3.*\(50, 64\).*\(96, 64\)"):
        load_model(ModelConfig.from_pretrained(str(tmp_path)), "auto", "cpu")
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"model.layers.1.mlp.experts.w13_weight"):
        load_model(ModelConfig.from_pretrained(str(tmp_path)), "auto", "cpu")


# ---- dummy weights and tensor parallelism ----------------------------------------------------------------
def test_dummy_weights_have_checkpoint_shapes_and_split_over_ranks(make_tiny):
    """Each expert's w1/w3/w2 is drawn whole from its own seed; with 2 ranks each keeps half of every
    expert's intermediate dim, so the shards concatenate to the 1-rank model."""
    path = make_tiny("qwen2_moe")
    cfg = ModelConfig.from_pretrained(str(path), dtype="float32")
    real = load_model(cfg, "auto", "cpu")
    one = load_model(cfg, "dummy", "cpu")
    assert {n: p.shape for n, p in one.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    w1 = dummy_tensor("model.layers.0.mlp.experts.w13_weight", (3, "w1"), (32, 64), torch.float32, "cpu")
    assert torch.equal(one.model.layers[0].mlp.experts.w13_weight[3, :32], w1) and w1.std() > 0.01
    two = dummy_rank_models(cfg, 2)
    for name in ("w13_weight", "w2_weight"):
        full = one.model.layers[1].mlp.experts.get_parameter(name)
        shards = [m.model.layers[1].mlp.experts.get_parameter(name) for m in two]
        if name == "w2_weight":
            assert torch.equal(torch.cat(shards, dim=2), full)
        else:   # [gate | up] of each rank's half
            halves = [s.chunk(2, dim=1) for s in shards]
            assert torch.equal(torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1), full)
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    assert torch.equal(two[1].get_parameter(gate), one.get_parameter(gate))   # replicated
    logits = ModelHarness(one).extend([0, 1], [[5, 6, 7], [8, 9]])
    assert torch.isfinite(logits).all()


def test_fused_moe_rejects_an_intermediate_size_the_ranks_do_not_divide():
    with pytest.raises(ValueError, match=r"intermediate size \(30\) is not divisible by the tensor-parallel size 4"):
        FusedMoE(4, 2, 16, 30, True, tp_rank=0, tp_size=4)


def test_tp2_greedy_tokens_equal_tp1_with_a_shared_expert(make_tiny):
    """Qwen2-MoE over gloo: routed experts and the shared expert each give a partial sum, all-reduced once."""
    from test_tp import _generate

    path = make_tiny("qwen2_moe", num_shards=2)
    one = _generate(path, 1, max_new_tokens=12)
    assert all(len(v) == 12 for v in one.values())
    assert _generate(path, 2, max_new_tokens=12) == one


# ---- graphs ---------------------------------------------------------------------------------------------------
def test_graphs_stay_off_while_fused_moe_is_not_graph_safe(make_tiny, fake_graphs, monkeypatch):  # noqa: F811
    path = make_tiny("qwen3_moe")
    assert TorchLayerOps.fused_moe_graph_safe is False
    runner = make_runner(path, GraphCpuPlatform(), enable_piecewise_cuda_graph=True)
    assert runner.graph_runner is None and runner.piecewise_runner is None and not fake_graphs
    reason = "off (mixture-of-experts model: layer ops torch run the experts with host reads"
    assert f"graphs={reason}" in runner.describe() and f"piecewise_graphs={reason}" in runner.describe()
    # a dense model on the same platform is captured, and so is the MoE model once fused_moe is graph-safe
    assert make_runner(make_tiny("qwen3"), GraphCpuPlatform()).graph_runner is fake_graphs[0]
    monkeypatch.setattr(TorchLayerOps, "fused_moe_graph_safe", True)
    assert make_runner(path, GraphCpuPlatform()).graph_runner is fake_graphs[1]


# ---- make_model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_make_model_writes_hub_expert_names_and_decodes_far_from_ties(make_tiny, arch):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = make_tiny(arch)
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == [HF_ARCH[arch]]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    down = "w2" if arch == "mixtral" else "down_proj"
    assert f"model.layers.1.{block}.experts.7.{down}.weight" in names
    assert f"model.layers.1.{block}.gate.weight" in names
    if arch == "qwen3_moe":
        assert raw["num_experts"] == 8 and "num_local_experts" not in raw
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == {"mixtral": "</s>", "qwen2_moe": "<|im_end|>", "qwen3_moe": "<|im_end|>"}[arch]
    hf = hf_model(path)
    gaps, continuations = [], []
    for prompt in ["Dear Tomas,", "def fibonacci(n):", "User: Why is the sky blue?"]:
        tokens, logits = _greedy(hf, tok(prompt).input_ids, steps=12)
        top2 = logits.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
        continuations.append(tuple(tokens))
    assert len(set(continuations)) == 3
    assert torch.cat(gaps).min() > 5e-4


def test_make_model_refuses_a_chat_format_of_another_family(tmp_path):
    with pytest.raises(ValueError, match="unknown chat format 'qwen3' for mixtral: choose one of mistral"):
        make_model("mixtral", "tiny", tmp_path, chat="qwen3")


def test_served_through_the_openai_chat_route(make_tiny):
    """`anyserve serve` with a MoE model answers a chat request, and its startup line says why graphs are off."""
    import httpx
    from server_fixture import running_server

    path = make_tiny("qwen3_moe")
    body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 12,
            "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
    with running_server(path, "--max-total-tokens", "2048", "--grpc-port", "0") as srv:
        body["model"] = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["usage"]["completion_tokens"] == 12 or answer["choices"][0]["finish_reason"] == "stop"
        assert answer["choices"][0]["message"]["content"]
        assert "graphs=off (cpu has no device graphs)" in srv.log_tail()
