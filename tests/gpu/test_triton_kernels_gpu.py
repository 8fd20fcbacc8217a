"""The Triton kernels on a real GPU at Llama-3.1-8B's attention shapes (32 q heads, 8 KV heads,
head dim 128, bf16), contexts up to 8k, page sizes 1 and 16, against an fp32 torch reference;
the fused layer ops at Llama-3.1-8B's hidden sizes; and decode captured in a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from attention_case import step_inputs
from engine.mem_cache.kv_pool import KVPool
from engine.runner.forward_batch import ForwardBatch, ForwardMode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

DEVICE = torch.device("cuda")
LLAMA_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)


def make_setup(lens, page_size, num_q_heads, num_kv_heads, head_dim, dtype, seed=0, kv_dtype=None):
    """A one-layer pool of random stale values with each request's pages in shuffled order
    (kv_dtype: the pool's, when not the model's)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    max_context = max(lens)
    pages_per_req = -(-max_context // page_size)
    num_pages = len(lens) * pages_per_req + 7
    pool = KVPool(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=kv_dtype or dtype,
                  device=DEVICE, num_pages=num_pages, page_size=page_size)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.copy_(torch.randn(buf.shape, device=DEVICE, generator=g))
    pages = torch.randperm(num_pages, device=DEVICE, generator=g)[: len(lens) * pages_per_req].view(len(lens), -1)
    pos = torch.arange(max_context, device=DEVICE)
    req_to_token = torch.zeros(len(lens) + 3, max_context, dtype=torch.int32, device=DEVICE)
    rows = torch.arange(len(lens), device=DEVICE) + 2
    req_to_token[rows] = (pages[:, pos // page_size] * page_size + pos % page_size).int()
    return pool, req_to_token, rows, g


def make_backend(pool, req_to_token, page_size, num_q_heads, num_kv_heads, head_dim, dtype):
    from hal.registry import entries

    return entries("attention")["triton"].factory(
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, kv_pool=pool,
        req_to_token=req_to_token, page_size=page_size, dtype=dtype, device=DEVICE)


def reference(q, pool, req_to_token, rows, prefix_lens, ext_lens, scaling, sliding_window=None):
    """fp32 attention per request: new token j of request i sees positions 0 .. prefix_i + j (with
    a sliding window W, only those > prefix_i + j - W)."""
    outs, t0 = [], 0
    for r, p, n in zip(rows.tolist(), prefix_lens, ext_lens):
        slots = req_to_token[r, : p + n].long()
        group = q.shape[1] // pool.num_kv_heads
        k = pool.k_buffers[0][slots].float().repeat_interleave(group, dim=1)    # [S, Hq, D]
        v = pool.v_buffers[0][slots].float().repeat_interleave(group, dim=1)
        qi = q[t0:t0 + n].float()                                                # [n, Hq, D]
        scores = torch.einsum("nhd,shd->hns", qi, k) * scaling                   # [Hq, n, S]
        k_pos, q_pos = torch.arange(p + n, device=DEVICE)[None, :], (p + torch.arange(n, device=DEVICE))[:, None]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        outs.append(torch.einsum("hns,shd->nhd", scores.softmax(-1), v))
        t0 += n
    return torch.cat(outs)


def make_case(mode, prefix_lens, ext_lens, page_size, dtype=torch.bfloat16, shapes=LLAMA_8B, kv_dtype=None):
    """A filled KV pool and one step's batch and q/k/v at these lengths (any attention backend)."""
    hq, hkv, d = shapes["num_q_heads"], shapes["num_kv_heads"], shapes["head_dim"]
    seq = [p + n for p, n in zip(prefix_lens, ext_lens)]
    pool, req_to_token, rows, g = make_setup(seq, page_size, hq, hkv, d, dtype, kv_dtype=kv_dtype)
    batch, qkv = step_inputs(mode, req_to_token, rows, prefix_lens, ext_lens, hq, hkv, d, dtype, g, DEVICE)
    return pool, req_to_token, rows, batch, qkv


def run(mode, prefix_lens, ext_lens, page_size, dtype=torch.bfloat16, shapes=LLAMA_8B, rotary=False,
        kv_dtype=None, sliding_window=None):
    """One step against the fp32 reference over what the pool holds; rotary (decode): q and k go
    in unrotated and the attention kernel rotates them and stores k, v itself. kv_dtype (fp8):
    the stores round exactly as torch's saturating cast does. sliding_window: the layer's."""
    from engine.mem_cache.kv_pool import to_kv_dtype

    hq, hkv, d = shapes["num_q_heads"], shapes["num_kv_heads"], shapes["head_dim"]
    pool, req_to_token, rows, batch, (q, k, v) = make_case(mode, prefix_lens, ext_lens, page_size, dtype, shapes,
                                                           kv_dtype)
    loc = batch.out_cache_loc
    backend = make_backend(pool, req_to_token, page_size, hq, hkv, d, dtype)
    backend.init_forward_metadata(batch)
    window = {} if sliding_window is None else dict(sliding_window=sliding_window)
    tol = 2e-5 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 2e-2)
    if rotary:
        from backends.cpu.torch_layer_ops import TorchLayerOps
        from engine.layers.rotary import RotaryEmbedding

        assert backend.fuses_rotary(batch)
        positions = torch.tensor([p + n - 1 for p, n in zip(prefix_lens, ext_lens)], device=DEVICE)
        cos, sin = RotaryEmbedding(d, 16384, 500000.0).to(DEVICE).cos_sin(positions, dtype)
        out = backend.forward(q, k, v, 0, d ** -0.5, batch, cos_sin=(cos, sin), **window)
        if kv_dtype is not None:   # rotated in fp32, rounded once; fp32 sums may part at a rounding edge
            k32 = TorchLayerOps().apply_rotary(q.float(), k.float(), cos.float(), sin.float())[1]
            same = pool.k_buffers[0][loc].view(torch.uint8) == to_kv_dtype(k32, kv_dtype).view(torch.uint8)
            assert same.float().mean() > 0.999, same.float().mean()
        q, k = TorchLayerOps().apply_rotary(q, k, cos, sin)
        if kv_dtype is None:
            torch.testing.assert_close(pool.k_buffers[0][loc], k, atol=tol, rtol=tol)
        assert torch.equal(pool.v_buffers[0][loc], to_kv_dtype(v, pool.dtype))
    else:
        out = backend.forward(q, k, v, 0, d ** -0.5, batch, **window)
        assert torch.equal(pool.k_buffers[0][loc], to_kv_dtype(k, pool.dtype))
        assert torch.equal(pool.v_buffers[0][loc], to_kv_dtype(v, pool.dtype))
    ref = reference(q, pool, req_to_token, rows, prefix_lens, ext_lens, d ** -0.5, sliding_window)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("rotary", [False, True], ids=["rotated", "rotary-in-kernel"])
def test_decode_llama8b_shapes_up_to_8k(page_size, rotary):
    lens = [1, 17, 512, 1000, 4096, 8192, 3001, 64]
    run(ForwardMode.DECODE, [n - 1 for n in lens], [1] * len(lens), page_size, rotary=rotary)
    # batch 1: as many splits as the H200 takes, the new token in the last one
    run(ForwardMode.DECODE, [767], [1], page_size, rotary=rotary)


@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_llama8b_shapes_with_prefixes(page_size):
    run(ForwardMode.EXTEND, [0, 4000, 7000, 15, 0], [1024, 96, 1192, 1, 333], page_size)


@pytest.mark.parametrize("window", [1, 100, 4096])
@pytest.mark.parametrize("page_size", [1, 16])
def test_sliding_window_llama8b_shapes(window, page_size):
    """Compiled kernels (the interpreter tests cover the same paths at small shapes): decode with
    rotary in the kernel and extend over long prefixes, windows of one token to Mistral's 4096."""
    lens = [1, 17, 512, 1000, 4096, 8192, 3001, 64]
    run(ForwardMode.DECODE, [n - 1 for n in lens], [1] * len(lens), page_size, rotary=True, sliding_window=window)
    run(ForwardMode.EXTEND, [0, 4000, 7000, 15, 0], [1024, 96, 1192, 1, 333], page_size, sliding_window=window)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_pool_llama8b_shapes(kv_dtype):
    """--kv-cache-dtype fp8_*: stores round as torch's cast (saturating), decode (with and without
    the rotary store inside) and extend read the pool back in bf16."""
    if kv_dtype == torch.float8_e4m3fn and torch.version.cuda and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton converts e4m3 only from sm89 on")
    lens = [1, 17, 1000, 4096, 8192, 64]
    for rotary in (False, True):
        run(ForwardMode.DECODE, [n - 1 for n in lens], [1] * len(lens), 16, rotary=rotary, kv_dtype=kv_dtype)
    run(ForwardMode.EXTEND, [0, 4000, 15], [1024, 96, 1], 16, kv_dtype=kv_dtype)
    # values past the range saturate
    pool, req_to_token, rows, batch, (q, k, v) = make_case(ForwardMode.EXTEND, [0], [64], 1, kv_dtype=kv_dtype)
    backend = make_backend(pool, req_to_token, 1, 32, 8, 128, torch.bfloat16)
    backend.init_forward_metadata(batch)
    k, v = (k * 1e5).to(torch.bfloat16), (v * 1e5).to(torch.bfloat16)
    backend.forward(q, k, v, 0, 128 ** -0.5, batch)
    limit = torch.finfo(kv_dtype).max
    stored = pool.k_buffers[0][batch.out_cache_loc].float()
    assert not stored.isnan().any() and stored.abs().max().item() == limit


@pytest.mark.parametrize("head_dim, gqa", [(64, 4), (256, 2)])
@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND], ids=["decode", "extend"])
def test_other_head_dims(head_dim, gqa, mode):
    shapes = dict(num_q_heads=8 * gqa, num_kv_heads=8, head_dim=head_dim)
    if mode.is_decode:
        run(mode, [2047, 99, 0], [1, 1, 1], 16, shapes=shapes)
    else:
        run(mode, [0, 1500, 33], [700, 64, 1], 16, shapes=shapes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32(dtype):
    run(ForwardMode.DECODE, [4095, 10], [1, 1], 16, dtype=dtype)
    run(ForwardMode.EXTEND, [100, 0], [300, 257], 1, dtype=dtype)


def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    """Decode launches no host sync and keeps its buffers: captured once, replayed for new
    sequence lengths, it matches an eager step on the same inputs."""
    hq, hkv, d = LLAMA_8B["num_q_heads"], LLAMA_8B["num_kv_heads"], LLAMA_8B["head_dim"]
    bs, max_len, dtype = 8, 2048, torch.bfloat16
    pool, req_to_token, rows, g = make_setup([max_len] * bs, 16, hq, hkv, d, dtype)
    backend = make_backend(pool, req_to_token, 16, hq, hkv, d, dtype)
    backend.reserve(bs)
    q = torch.randn(bs, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(bs, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(bs, hkv, d, device=DEVICE, dtype=dtype)
    seq_lens = torch.full((bs,), 100, dtype=torch.int64, device=DEVICE)
    loc = torch.zeros(bs, dtype=torch.int64, device=DEVICE)

    def set_lengths(lens):
        seq_lens.copy_(torch.tensor(lens, device=DEVICE))
        loc.copy_(req_to_token[rows, seq_lens - 1].long())

    batch = ForwardBatch(mode=ForwardMode.DECODE, batch_size=bs, input_ids=loc, positions=loc,
                         req_pool_indices=rows, seq_lens=seq_lens, out_cache_loc=loc, seq_lens_cpu=[100] * bs)
    set_lengths([100] * bs)
    backend.init_forward_metadata(batch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(q, k, v, 0, d ** -0.5, batch)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, 0, d ** -0.5, batch)
    for lens in ([1, 2, 3, 2048, 1000, 17, 64, 512], [2000] * bs):
        set_lengths(lens)
        q.normal_()
        graph.replay()
        batch.seq_lens_cpu = list(lens)
        backend.init_forward_metadata(batch)
        eager = backend.forward(q, k, v, 0, d ** -0.5, batch)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        ref = reference(q, pool, req_to_token, rows, [n - 1 for n in lens], [1] * bs, d ** -0.5)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_ops_llama8b_sizes(dtype):
    from backends.cpu.torch_layer_ops import TorchLayerOps
    from backends.triton.layer_ops import TritonLayerOps

    ours, ref = TritonLayerOps(device=DEVICE), TorchLayerOps()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    t = 77
    x = torch.randn(t, 4096, device=DEVICE, generator=g).to(dtype)
    res = torch.randn(t, 4096, device=DEVICE, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(4096, device=DEVICE, generator=g)).to(dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    for a, b in zip(ours.rms_norm(x, w, 1e-5, res), ref.rms_norm(x, w, 1e-5, res)):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ours.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **tol)
    gate_up = torch.randn(t, 2 * 14336, device=DEVICE, generator=g).to(dtype)
    torch.testing.assert_close(ours.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **tol)
    qkv = torch.randn(t, (32 + 16) * 128, device=DEVICE, generator=g).to(dtype)
    q, k = qkv[:, :4096].view(t, 32, 128), qkv[:, 4096:5120].view(t, 8, 128)
    from engine.layers.rotary import RotaryEmbedding

    with torch.device(DEVICE):
        rope = RotaryEmbedding(128, 8192, 500000.0)
    cos, sin = rope.cos_sin(torch.randint(0, 8192, (t,), device=DEVICE, generator=g), dtype)
    for a, b in zip(ours.apply_rotary(q, k, cos, sin), ref.apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(a, b, **tol)


def check_graph_replay(fn, x, fresh):
    """fn() captured in a CUDA graph, x refilled with ``fresh``, replayed: equal to fn() run eagerly."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(captured, fn(), atol=0, rtol=0)


def gemv_launch() -> dict:
    """The GEMV launch parameters of the platform's kernel config, as the layer ops pass them."""
    from backends.triton.layer_ops import TritonLayerOps

    return TritonLayerOps(torch.device(DEVICE)).gemv_launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 40])
def test_gemv_llama8b_projections(dtype, rows):
    """The GEMV at Llama-3.1-8B's four projections (SiLU-and-mul fused into down's input) against
    an fp32 reference, with the platform's launch parameters (one row: the one-row kernel; more:
    the CUDA-core kernel up to 4 rows, the tile kernel beyond), eager and replayed in a CUDA graph."""
    from backends.cpu.torch_layer_ops import TorchLayerOps
    from backends.triton.gemv import ROW_KERNEL_MAX_ROWS, gemv

    launch = gemv_launch()
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    for n, k, silu in ((6144, 4096, False), (4096, 4096, False), (28672, 4096, False), (4096, 14336, True)):
        x = torch.randn(rows, 2 * k if silu else k, device=DEVICE, generator=g).to(dtype)
        w = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).to(dtype)
        b = torch.randn(n, device=DEVICE, generator=g).to(dtype)
        xin = TorchLayerOps().silu_and_mul(x) if silu else x
        ref = torch.nn.functional.linear(xin.float(), w.float(), b.float())
        if silu and rows > ROW_KERNEL_MAX_ROWS:          # the tile kernel takes the product's input
            x, silu = xin, False
        out = gemv(x, w, b, silu_mul_input=silu, **launch)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        check_graph_replay(lambda: gemv(x, w, b, silu_mul_input=silu, **launch), x,
                           torch.randn(x.shape, device=DEVICE, generator=g).to(dtype))


@pytest.mark.parametrize("rows", [17, 40, 64, 128])
def test_skinny_gemm_llama8b_projections(rows):
    """The one-pass GEMM of 17-128 rows at Llama-3.1-8B's four projections with the platform's
    launch parameters (down split along K), bias and residual, against an fp32 reference, eager
    and replayed in a CUDA graph."""
    from backends.triton.layer_ops import TritonLayerOps
    from backends.triton.skinny_gemm import skinny_gemm

    launch = TritonLayerOps(torch.device(DEVICE)).skinny_launch
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    dt = torch.bfloat16
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        x = torch.randn(rows, k, device=DEVICE, generator=g).to(dt)
        w = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).to(dt)
        b = torch.randn(n, device=DEVICE, generator=g).to(dt)
        r = torch.randn(rows, n, device=DEVICE, generator=g).to(dt)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float()) + r.float()
        torch.testing.assert_close(skinny_gemm(x, w, b, residual=r, **launch).float(), ref, atol=3e-2, rtol=2e-2)
        check_graph_replay(lambda: skinny_gemm(x, w, b, residual=r, **launch), x,
                           torch.randn(x.shape, device=DEVICE, generator=g).to(dt))


@pytest.mark.parametrize("rows", [1, 8])
def test_gemv_norm_and_residual_llama8b_projections(rows):
    """The GEMV as a decoder layer calls it: at batch 1 the RMSNorm folded into q/k/v and gate/up,
    and at batches 1 and 8 the residual added by o and down, against fp32 references, eager and in
    a CUDA graph."""
    from backends.cpu.torch_layer_ops import TorchLayerOps
    from backends.triton.gemv import gemv

    launch = gemv_launch()
    g = torch.Generator(device=DEVICE).manual_seed(3)
    dt = torch.bfloat16
    for n, k, norm in ((6144, 4096, True), (28672, 4096, True), (4096, 4096, False), (4096, 14336, False)):
        if norm and rows > 1:
            continue                    # the tile kernel takes rms_norm's output
        x = (4 * torch.randn(rows, k, device=DEVICE, generator=g)).to(dt)
        w = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).to(dt)
        if norm:
            norm_w = (1 + 0.3 * torch.randn(k, device=DEVICE, generator=g)).to(dt)
            kw = dict(norm=(norm_w, 1e-5))
            ref = torch.nn.functional.linear(TorchLayerOps().rms_norm(x, norm_w, 1e-5).float(), w.float())
        else:
            r = torch.randn(rows, n, device=DEVICE, generator=g).to(dt)
            kw = dict(residual=r)
            ref = torch.nn.functional.linear(x.float(), w.float()) + r.float()
        torch.testing.assert_close(gemv(x, w, **kw, **launch).float(), ref, atol=3e-2, rtol=2e-2)
        check_graph_replay(lambda: gemv(x, w, **kw, **launch), x,
                           (4 * torch.randn(x.shape, device=DEVICE, generator=g)).to(dt))
