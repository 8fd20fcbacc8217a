"""The Triton mixture-of-experts MLP (backends/triton/fused_moe.py) on the CPU through Triton's
interpreter: against the reference (LayerOps.fused_moe, through the torch layer ops) and a float64
loop over tokens, on fresh random routings; and the device-side alignment of (token, slot) pairs
to expert blocks alone. Shapes are tiny; tests/gpu/test_fused_moe_gpu.py runs real ones."""
from __future__ import annotations

from triton_interpret import fresh_process_tests  # first: sets TRITON_INTERPRET

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from backends.cpu.torch_layer_ops import TorchLayerOps  # noqa: E402
import backends.triton.fused_moe as fused_moe_module  # noqa: E402
from backends.triton.fused_moe import (ALIGN_KERNEL_MAX_PAIRS, align_pairs, choose_block_m, fused_moe,  # noqa: E402
                                       max_blocks)
from backends.triton.layer_ops import TritonLayerOps  # noqa: E402
from hal.kernel_config import KernelConfig  # noqa: E402
from hal.layer_ops import LayerOps  # noqa: E402

# small tiles, so that the tiny shapes cross several blocks of N and K and leave ragged edges
SMALL = dict(block_m=64, block_n=16, block_k=16)


_interpreter_process, test_fused_moe_in_a_fresh_process = fresh_process_tests(__file__, "test_fused_moe_in_a_fresh_process")


def route(num_tokens, num_experts, top_k, g, id_dtype=torch.int64, among=None):
    """A router's output: each token's top_k distinct experts (of the first ``among``, so the rest
    get no tokens) and their softmax weights, float32."""
    among = among or num_experts
    logits = torch.randn(num_tokens, among, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return weights, ids.to(id_dtype)


def make_moe(num_tokens, num_experts, hidden, inter, dtype, g):
    """x [T, H] and expert weights w13 [E, 2I, H], w2 [E, H, I], scaled to keep outputs near 1."""
    x = (2 * torch.randn(num_tokens, hidden, generator=g)).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    return x, w13, w2


def float64_moe(x, w13, w2, topk_weights, topk_ids):
    """out[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), token by token in float64,
    no rounding in between."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e].double() @ x[t].double()
            h = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ h)
    return out


def check_close(out, ref, dtype, ulps):
    """Within ``ulps`` units of x's dtype at the output's scale (fp32: 1e-5 relative)."""
    eps = 1e-5 if dtype == torch.float32 else ulps * torch.finfo(dtype).eps
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref.double(), atol=eps * scale, rtol=eps)


# ---- the alignment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m,among,id_dtype", [
    (1, 8, 2, 16, None, torch.int64),       # decode: two pairs, six empty experts
    (4, 8, 2, 16, 8, torch.int32),          # as many pairs as experts
    (37, 5, 3, 16, 3, torch.int32),         # many pairs per expert, two experts get none
    (50, 7, 1, 32, None, torch.int64),      # k = 1, E a prime
    (70, 20, 2, 16, None, torch.int32),     # the kernel's chunks of 64 pairs: a group spans three
])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
def test_align_pairs_puts_every_pair_once_in_its_experts_padded_blocks(num_tokens, num_experts, top_k, block_m,
                                                                      among, id_dtype, use_kernel):
    g = torch.Generator().manual_seed(num_tokens)
    _, ids = route(num_tokens, num_experts, top_k, g, id_dtype, among)
    if num_tokens == 4:
        ids = torch.randperm(8, generator=g).view(4, 2).to(id_dtype)    # every expert exactly once
    a = align_pairs(ids, num_experts, block_m, use_kernel=use_kernel)
    pairs, experts, used = a.sorted_pairs.long(), a.block_expert.long(), int(a.num_used)
    num_pairs, flat = ids.numel(), ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)

    assert a.num_blocks == max_blocks(num_pairs, num_experts, block_m) and pairs.shape == (a.num_blocks * block_m,)
    assert torch.equal(torch.sort(pairs[pairs < num_pairs]).values, torch.arange(num_pairs))   # each pair once
    assert ((pairs == num_pairs) | (pairs < num_pairs)).all()                                  # the rest: padding
    assert used == int(((counts + block_m - 1) // block_m).sum())
    # the used blocks first, experts ascending, each expert's blocks ceil(count / block_m) of them
    assert torch.equal(experts[:used], torch.repeat_interleave(torch.arange(num_experts),
                                                               (counts + block_m - 1) // block_m))
    assert (experts[used:] == -1).all() and (pairs[used * block_m:] == num_pairs).all()
    for b in range(used):
        real = pairs[b * block_m:(b + 1) * block_m]
        real = real[real < num_pairs]
        assert len(real) and (flat[real] == experts[b]).all()
    for e in range(num_experts):    # a group: its pairs in token order, then its padding
        rows = pairs[(experts == e).repeat_interleave(block_m)]
        n = int(counts[e])
        assert torch.equal(rows[:n], torch.nonzero(flat == e).flatten()) and (rows[n:] == num_pairs).all()
    if num_tokens == 4:
        assert used == a.num_blocks      # the worst case is reached: one block per pair


def test_align_pairs_shapes_follow_the_shapes_alone_and_nothing_is_read_back(monkeypatch):
    """On the meta device (shapes, no values) the torch alignment runs and gives the shapes it gives
    on real ids: no op's output shape depends on the ids (the Triton one is one launch of a fixed
    grid). With every tensor-to-Python conversion patched to raise, the whole fused_moe still runs,
    through either. What this does not prove: that each torch op used is free of an internal device
    synchronization (tests/gpu runs it in a CUDA graph and with torch.cuda.set_sync_debug_mode("error"))."""
    g = torch.Generator().manual_seed(5)
    for num_tokens, num_experts, top_k in ((1, 8, 2), (9, 4, 3)):
        _, ids = route(num_tokens, num_experts, top_k, g)
        real = align_pairs(ids, num_experts, 16, use_kernel=False)
        meta = align_pairs(ids.to("meta"), num_experts, 16, use_kernel=False)
        for name in ("sorted_pairs", "block_expert", "num_used"):
            r, m = getattr(real, name), getattr(meta, name)
            assert m.is_meta and m.shape == r.shape and m.dtype == r.dtype, name

    def host_read(*args, **kwargs):
        raise AssertionError("fused_moe read a tensor back to the host")

    x, w13, w2 = make_moe(5, 6, 32, 16, torch.float32, g)
    weights, ids = route(5, 6, 2, g)
    ref = TorchLayerOps().fused_moe(x, w13, w2, weights, ids)
    for max_pairs in (ALIGN_KERNEL_MAX_PAIRS, 0):
        monkeypatch.setattr(fused_moe_module, "ALIGN_KERNEL_MAX_PAIRS", max_pairs)
        for name in ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        out = fused_moe(x, w13, w2, weights, ids, **SMALL)
        monkeypatch.undo()
        check_close(out, ref, torch.float32, 0)


# ---- the kernels against the reference -------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,dtype,id_dtype,among", [
    (1, 4, 2, 32, 24, torch.float32, torch.int64, None),     # decode, ragged N of the first pass
    (1, 9, 8, 48, 40, torch.bfloat16, torch.int32, None),    # k = 8 of 9 experts at T = 1
    (40, 3, 2, 40, 20, torch.float32, torch.int32, None),    # many pairs per expert: 32-row blocks, ragged K
    (13, 7, 1, 24, 20, torch.float16, torch.int64, 4),       # k = 1, three experts empty
    (6, 10, 3, 32, 16, torch.bfloat16, torch.int64, 5),      # half the experts empty
])
def test_triton_fused_moe_matches_reference_and_float64(num_tokens, num_experts, top_k, hidden, inter, dtype,
                                                        id_dtype, among, monkeypatch):
    g = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    x, w13, w2 = make_moe(num_tokens, num_experts, hidden, inter, dtype, g)
    weights, ids = route(num_tokens, num_experts, top_k, g, id_dtype, among)
    out = fused_moe(x, w13, w2, weights, ids, **SMALL)
    ref = TorchLayerOps().fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    # the same roundings as the reference; the interpreter truncates where a GPU rounds to nearest,
    # so an intermediate may differ by one unit: a few at the output
    check_close(out, ref, dtype, 4)
    check_close(out, float64_moe(x, w13, w2, weights, ids), dtype, 8)
    if num_tokens == 40:    # the torch alignment (extend batches) gives the same blocks: the same bits
        monkeypatch.setattr(fused_moe_module, "ALIGN_KERNEL_MAX_PAIRS", 0)
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, **SMALL), out, atol=0, rtol=0)


def test_triton_fused_moe_rounds_where_the_reference_rounds():
    """float16 experts whose weight rows each add up two features: every product is exact in
    float32 but not in float16, so only the roundings the contract states decide the output (the
    gate and up products, silu(gate), the SiLU-and-mul, the down product, the float32 sum of two
    slots), and it equals the reference's bit for bit (the interpreter rounds float16 to nearest, as
    torch does; not bfloat16, which it truncates)."""
    g = torch.Generator().manual_seed(9)
    num_tokens, num_experts, hidden, inter = 24, 3, 32, 24

    def two_hot(n, k):
        return sum(F.one_hot(torch.randint(0, k, (n,), generator=g), k) for _ in range(2))

    x = (4 * torch.randn(num_tokens, hidden, generator=g)).half()
    w13 = torch.stack([two_hot(2 * inter, hidden) for _ in range(num_experts)]).half()   # [E, 2I, H]
    w2 = torch.stack([two_hot(hidden, inter) for _ in range(num_experts)]).half()        # [E, H, I]
    weights, ids = route(num_tokens, num_experts, 2, g)
    out = fused_moe(x, w13, w2, weights, ids, **SMALL)
    torch.testing.assert_close(out, TorchLayerOps().fused_moe(x, w13, w2, weights, ids), atol=0, rtol=0)


def test_triton_fused_moe_strided_rows_repeated_experts_and_no_tokens():
    """x as a view into a wider tensor (row stride > H) and as a transposed one (no unit stride:
    copied); ids from randint, so one token may pick an expert twice (the reference adds both);
    bfloat16 routing weights; T = 0 gives an empty [0, H]."""
    g = torch.Generator().manual_seed(7)
    x, w13, w2 = make_moe(11, 5, 24, 16, torch.float32, g)
    wide = torch.randn(11, 40, generator=g)
    wide[:, 8:32] = x
    ids = torch.randint(0, 5, (11, 3), generator=g, dtype=torch.int32)
    weights = torch.rand(11, 3, generator=g)
    ref = TorchLayerOps().fused_moe(x, w13, w2, weights, ids)
    check_close(fused_moe(wide[:, 8:32], w13, w2, weights, ids, **SMALL), ref, torch.float32, 0)
    check_close(fused_moe(x.t().contiguous().t(), w13, w2, weights, ids, **SMALL), ref, torch.float32, 0)
    ref16 = TorchLayerOps().fused_moe(x, w13, w2, weights.bfloat16(), ids)
    check_close(fused_moe(x, w13, w2, weights.bfloat16(), ids, **SMALL), ref16, torch.float32, 0)
    empty = fused_moe(x[:0].bfloat16(), w13.bfloat16(), w2.bfloat16(), weights[:0], ids[:0], **SMALL)
    assert empty.shape == (0, 24) and empty.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="integer tensor"):
        fused_moe(x, w13, w2, weights, ids.float(), **SMALL)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(x, w13.half(), w2, weights, ids, **SMALL)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids, **SMALL)


def test_triton_layer_ops_fused_moe_is_graph_safe_and_takes_the_kernel_config():
    from backends.rocm.aiter_layer_ops import AiterLayerOps

    assert LayerOps.fused_moe_graph_safe is False and TorchLayerOps.fused_moe_graph_safe is False
    assert TritonLayerOps.fused_moe_graph_safe is True and AiterLayerOps.fused_moe_graph_safe is True
    assert AiterLayerOps.fused_moe is TritonLayerOps.fused_moe
    ops = TritonLayerOps(kernel_config=KernelConfig(moe_block_m=16, moe_block_n=16, moe_block_k=32,
                                                    moe_num_stages=2))
    assert ops.moe_launch == dict(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                                  smem_bytes=KernelConfig().shared_memory_bytes)
    g = torch.Generator().manual_seed(8)
    x, w13, w2 = make_moe(20, 3, 40, 24, torch.float32, g)
    weights, ids = route(20, 3, 2, g)
    check_close(ops.fused_moe(x, w13, w2, weights, ids), TorchLayerOps().fused_moe(x, w13, w2, weights, ids),
                torch.float32, 0)


def test_block_rows_follow_the_mean_pairs_per_expert():
    assert choose_block_m(1 * 8, 128) == 16 and choose_block_m(16 * 2, 8) == 16     # decode
    assert choose_block_m(2048 * 8, 128, 64) == 64 and choose_block_m(2048 * 8, 128, 32) == 32
    assert choose_block_m(40 * 2, 3) == 32
    assert max_blocks(8, 128, 16) == 8            # T = 1, k = 8: the grid is 8 blocks, not 128
    assert max_blocks(2048 * 2, 8, 64) == (4096 + 8 * 63 + 63) // 64


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_models_on_the_triton_layer_ops_give_the_torch_tokens(arch, make_tiny):
    """A whole tiny MoE model with every layer op on Triton (the fused MoE, norms, rotary, the
    linears' kernels) in the interpreter, against the torch layer ops: prefill logits and greedy
    tokens (decode steps of 2 rows: the alignment kernel's path) in float32."""
    from engine.layers.ops import using_layer_ops
    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    cfg = ModelConfig.from_pretrained(str(make_tiny(arch)), dtype="float32")
    torch_model = load_model(cfg, "auto", "cpu")
    ops = TritonLayerOps(kernel_config=KernelConfig(moe_block_m=16, moe_block_n=16, moe_block_k=16))
    with using_layer_ops(ops):
        triton_model = load_model(cfg, "auto", "cpu")
    calls = []
    real = ops.fused_moe
    ops.fused_moe = lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (13, 6)]
    logits = ModelHarness(triton_model, page_size=4).extend([0, 1], prompts)
    torch.testing.assert_close(logits, ModelHarness(torch_model, page_size=4).extend([0, 1], prompts),
                               atol=1e-4, rtol=1e-4)
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 5)
    assert ModelHarness(triton_model, page_size=4).generate_greedy(prompts, 5) == ref
    assert 19 in calls and 2 in calls        # the prefill's rows and the decode steps' rows
