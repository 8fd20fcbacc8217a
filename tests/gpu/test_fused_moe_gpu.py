"""The Triton mixture-of-experts MLP on a real GPU at Mixtral-8x7B's and Qwen3-30B-A3B's expert
shapes in bf16, against the reference (LayerOps.fused_moe of the torch layer ops) at 1 to 2048
tokens; with no synchronizing op (torch's sync debug mode); and captured in a CUDA graph, then
replayed with other routings and inputs."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

DEVICE = torch.device("cuda")
# (experts, top_k, hidden, intermediate) of one MoE layer
SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}


@pytest.fixture(scope="module")
def ops():
    from backends.cpu.torch_layer_ops import TorchLayerOps
    from backends.triton.layer_ops import TritonLayerOps

    return TritonLayerOps(device=DEVICE), TorchLayerOps()


@pytest.fixture(scope="module", params=sorted(SHAPES))
def experts(request):
    """One layer's expert weights [E, 2I, H] and [E, H, I], bf16, scaled to keep outputs near 1."""
    num_experts, top_k, hidden, inter = SHAPES[request.param]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, generator=g) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=g) / inter ** 0.5).bfloat16()
    yield request.param, top_k, w13, w2
    del w13, w2
    torch.cuda.empty_cache()


def route(num_tokens, num_experts, top_k, g):
    """Each token's top_k distinct experts and their softmax weights (float32), int32 ids."""
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return weights, ids.int()


def check(out, ref):
    # bf16 products summed in fp32 in another order, then rounded: a few bf16 units at the output's scale
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=4e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("num_tokens", [1, 16, 256, 2048])
def test_fused_moe_matches_the_reference_at_real_shapes(ops, experts, num_tokens):
    triton_ops, torch_ops = ops
    name, top_k, w13, w2 = experts
    g = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, w13.shape[2], device=DEVICE, generator=g).bfloat16()
    weights, ids = route(num_tokens, w13.shape[0], top_k, g)
    if num_tokens == 256:
        ids[:, 0] = 0                 # one expert far busier than the rest
    out = triton_ops.fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    check(out, torch_ops.fused_moe(x, w13, w2, weights, ids))


@pytest.mark.parametrize("num_tokens", [16, 256])
def test_fused_moe_issues_no_synchronizing_op(ops, experts, num_tokens):
    """Both alignments: the Triton program (few pairs) and the torch ops (Qwen3-MoE's 2048 pairs)."""
    triton_ops, _ = ops
    name, top_k, w13, w2 = experts
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(num_tokens, w13.shape[2], device=DEVICE, generator=g).bfloat16()
    weights, ids = route(num_tokens, w13.shape[0], top_k, g)
    triton_ops.fused_moe(x, w13, w2, weights, ids)          # compile first: the launcher may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_ops.fused_moe(x, w13, w2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_tokens", [1, 16, 256])
def test_fused_moe_in_a_cuda_graph_replays_other_routings(ops, experts, num_tokens):
    """Captured once, replayed with fresh x, weights and ids (a random routing, then every token on
    the first k experts, then on the last k): equal to the eager kernel bit for bit, and to the
    reference. Qwen3-MoE at 256 tokens aligns its 2048 pairs with torch ops, the rest in Triton."""
    triton_ops, torch_ops = ops
    name, top_k, w13, w2 = experts
    num_experts = w13.shape[0]
    g = torch.Generator(device=DEVICE).manual_seed(11)
    x = torch.randn(num_tokens, w13.shape[2], device=DEVICE, generator=g).bfloat16()
    weights, ids = route(num_tokens, num_experts, top_k, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_ops.fused_moe(x, w13, w2, weights, ids)      # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.fused_moe(x, w13, w2, weights, ids)
    crowded = torch.arange(top_k, device=DEVICE).expand(num_tokens, top_k).int()
    for new_ids in (route(num_tokens, num_experts, top_k, g)[1], crowded, num_experts - 1 - crowded):
        x.copy_(torch.randn(x.shape, device=DEVICE, generator=g))
        weights.copy_(torch.rand(weights.shape, device=DEVICE, generator=g))
        ids.copy_(new_ids)
        graph.replay()
        torch.testing.assert_close(out, triton_ops.fused_moe(x, w13, w2, weights, ids), atol=0, rtol=0)
        check(out, torch_ops.fused_moe(x, w13, w2, weights, ids))
