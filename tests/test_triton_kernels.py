"""The portable Triton kernels (backends/triton) against plain torch references, on the CPU
through Triton's interpreter: paged extend and decode attention, the KV store, and the fused
layer ops. Shapes are small; the same kernels run at real shapes in tests/gpu."""
from __future__ import annotations

from triton_interpret import fresh_process_tests  # first: sets TRITON_INTERPRET

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from attention_case import step_inputs  # noqa: E402
from backends.cpu.torch_layer_ops import TorchLayerOps  # noqa: E402
from backends.triton.attention_backend import TritonAttentionBackend  # noqa: E402
from backends.triton.kv_store import store_kv  # noqa: E402
from backends.triton.layer_ops import TritonLayerOps  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402
from engine.mem_cache.kv_pool import KVPool, to_kv_dtype  # noqa: E402
from engine.runner.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from hal.kernel_config import KernelConfig  # noqa: E402
from test_torch_attention import CASES, check_steps_in_sequence, reference_attention  # noqa: E402

NUM_KV_HEADS = 2
# small tiles and splits so that short test sequences cross many blocks and sequence splits
SMALL = KernelConfig(decode_block_n=16, extend_block_m=16, extend_block_n=16, min_split_tokens=16,
                     max_kv_splits=8, num_compute_units=16)


_interpreter_process, test_triton_in_a_fresh_process = fresh_process_tests(__file__, "test_triton_in_a_fresh_process")


def test_kernels_run_in_the_interpreter():
    from backends.triton.extend_attention import _extend_kernel
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_extend_kernel, InterpretedFunction), "import order: TRITON_INTERPRET was set too late"


def tolerance(dtype):
    # the interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest): one bf16 ulp
    return {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
            torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]


def make_setup(page_size, num_q_heads, head_dim, dtype, batch_size, max_context=64, config=SMALL, seed=0,
               kv_dtype=None):
    """A pool holding random stale values, pages handed out in shuffled order, request rows not 0..B-1;
    kv_dtype: the pool's, when not the model's (fp8)."""
    g = torch.Generator().manual_seed(seed)
    pages_per_req = -(-max_context // page_size)
    num_pages = batch_size * pages_per_req + 3
    pool = KVPool(num_layers=2, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, dtype=kv_dtype or dtype,
                  device=torch.device("cpu"), num_pages=num_pages, page_size=page_size)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.copy_(torch.randn(buf.shape, generator=g))
    pages = torch.randperm(num_pages, generator=g)[: batch_size * pages_per_req].view(batch_size, -1)
    offsets = torch.arange(max_context)
    req_to_token = torch.zeros(batch_size + 2, max_context, dtype=torch.int32)
    rows = torch.randperm(batch_size + 2, generator=g)[:batch_size]
    req_to_token[rows] = (pages[:, offsets // page_size] * page_size + offsets % page_size).int()
    backend = TritonAttentionBackend(num_q_heads=num_q_heads, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim,
                                     kv_pool=pool, req_to_token=req_to_token, page_size=page_size,
                                     dtype=dtype, device=torch.device("cpu"), kernel_config=config)
    return backend, pool, req_to_token, rows, g


def assert_stored(stored, values):
    """The pool holds ``values`` as a store into its dtype rounds them (torch's cast, saturating
    into fp8). Into fp8, Triton's interpreter rounds ties away from zero, loses the carry when
    rounding up reaches the next power of two (1.96 -> 1.0) and flushes subnormals: those values
    are only checked for sign, range and a factor of two, all others exactly. On the GPU every
    value is exact (tests/gpu)."""
    expected = to_kv_dtype(values, stored.dtype)
    if stored.dtype.itemsize != 1:
        assert torch.equal(stored, expected)
        return
    rounded = lambda x: to_kv_dtype(x, stored.dtype).double()  # noqa: E731
    x, e, s = values.double(), expected.double(), stored.double()
    fi = torch.finfo(stored.dtype)
    safe = ((e.abs() >= fi.smallest_normal) & (torch.log2(e.abs()) % 1 != 0)
            & (rounded(x * (1 - 2 ** -12)) == rounded(x * (1 + 2 ** -12))))
    assert safe.double().mean() > 0.5 and torch.equal(s[safe], e[safe])
    assert not s.isnan().any() and (s.abs() <= fi.max).all() and (s * e >= 0).all()
    assert ((s - e).abs() <= 0.5 * e.abs() + fi.smallest_normal).all()


def run_step(mode, prefix_lens, ext_lens, page_size, num_q_heads, head_dim, dtype, config=SMALL, layer_id=1,
             rotary=False, kv_dtype=None, mixed_decodes=0, sliding_window=None):
    """One step against the fp64 reference over what the pool holds. rotary (decode): q and k go
    in unrotated with the requests' cos/sin and the backend rotates them (and stores k, v) inside
    its attention kernel. kv_dtype: the pool's (fp8), when not the model's. mixed_decodes (extend):
    the last requests decode one token each in the step (--enable-mixed-chunk). sliding_window:
    the layer's; the cached positions before the first new token's window are NaN in the pool,
    so a kernel that reads them (instead of skipping them) gives NaN."""
    max_context = max(64, max(p + n for p, n in zip(prefix_lens, ext_lens)))
    backend, pool, req_to_token, rows, g = make_setup(page_size, num_q_heads, head_dim, dtype,
                                                      len(prefix_lens), max_context, config, kv_dtype=kv_dtype)
    seq_lens = [p + n for p, n in zip(prefix_lens, ext_lens)]
    batch, (q, k, v) = step_inputs(mode, req_to_token, rows, prefix_lens, ext_lens, num_q_heads, NUM_KV_HEADS,
                                   head_dim, dtype, g)
    batch.attn_backend, loc, batch.mixed_decodes = backend, batch.out_cache_loc, mixed_decodes
    window = {} if sliding_window is None else dict(sliding_window=sliding_window)
    if sliding_window is not None:
        for r, p in zip(rows.tolist(), prefix_lens):
            unseen = req_to_token[r, : max(0, p - sliding_window + 1)].long()
            pool.k_buffers[layer_id][unseen] = float("nan")
            pool.v_buffers[layer_id][unseen] = float("nan")
    backend.init_forward_metadata(batch)
    if rotary:
        assert backend.fuses_rotary(batch)
        cos, sin = RotaryEmbedding(head_dim, max_context, 10000.0).cos_sin(torch.tensor(seq_lens) - 1, dtype)
        out = backend.forward(q, k, v, layer_id, head_dim ** -0.5, batch, cos_sin=(cos, sin), **window)
        if kv_dtype is not None:   # k rotated in fp32 and rounded once, into fp8
            k_fp32 = TorchLayerOps().apply_rotary(q.float(), k.float(), cos.float(), sin.float())[1]
            assert_stored(pool.k_buffers[layer_id][loc], k_fp32)
        q, k = TorchLayerOps().apply_rotary(q, k, cos, sin)
        if kv_dtype is None:
            torch.testing.assert_close(pool.k_buffers[layer_id][loc], k, **ops_tolerance(dtype))
        assert_stored(pool.v_buffers[layer_id][loc], v)
    else:
        out = backend.forward(q, k, v, layer_id, head_dim ** -0.5, batch, **window)
        assert_stored(pool.k_buffers[layer_id][loc], k)
        assert_stored(pool.v_buffers[layer_id][loc], v)
    k_all = [pool.k_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    v_all = [pool.v_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    ref = reference_attention(q, k_all, v_all, prefix_lens, ext_lens, head_dim ** -0.5, sliding_window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size, gqa", [(1, 4), (4, 1), (16, 2), (64, 4)])
def test_triton_attention_matches_reference_fp32(case, page_size, gqa):
    mode, prefix_lens, ext_lens = CASES[case]
    run_step(mode, prefix_lens, ext_lens, page_size, NUM_KV_HEADS * gqa, 64, torch.float32)


@pytest.mark.parametrize("mode, prefix_lens, ext_lens", [
    (ForwardMode.EXTEND, [5, 17, 0], [9, 1, 20]), (ForwardMode.DECODE, [0, 40, 63], [1, 1, 1])],
    ids=["extend", "decode"])
@pytest.mark.parametrize("head_dim, dtype, page_size", [
    (64, torch.bfloat16, 16), (128, torch.float16, 1), (128, torch.bfloat16, 64), (256, torch.bfloat16, 4),
    (256, torch.float32, 16)], ids=["hd64-bf16", "hd128-fp16", "hd128-bf16", "hd256-bf16", "hd256-fp32"])
def test_triton_attention_head_dims_and_dtypes(mode, prefix_lens, ext_lens, head_dim, dtype, page_size):
    run_step(mode, prefix_lens, ext_lens, page_size, 8, head_dim, dtype)
    if mode.is_decode:
        run_step(mode, prefix_lens, ext_lens, page_size, 8, head_dim, dtype, rotary=True)


@pytest.mark.parametrize("config", [SMALL, KernelConfig(num_compute_units=64), KernelConfig(max_kv_splits=1)],
                         ids=["small-tiles", "default-tiles", "no-split"])
@pytest.mark.parametrize("rotary", [False, True], ids=["rotated", "rotary-in-kernel"])
def test_triton_decode_long_contexts_split_along_the_sequence(config, rotary):
    """Contexts of hundreds of tokens: several splits per request (stage 2 merges them), some
    splits empty, plus a one-token context; with rotary in the kernel, the new token sits in
    the last non-empty split."""
    run_step(ForwardMode.DECODE, [300, 0, 129, 47], [1, 1, 1, 1], 16, 8, 64, torch.float32, config, rotary=rotary)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz],
                         ids=["e4m3fn", "e5m2", "e4m3fnuz"])
@pytest.mark.parametrize("mode, prefix_lens, ext_lens", [
    (ForwardMode.EXTEND, [5, 17, 0], [9, 1, 20]), (ForwardMode.DECODE, [0, 40, 130], [1, 1, 1])],
    ids=["extend", "decode"])
def test_triton_attention_over_an_fp8_pool(mode, prefix_lens, ext_lens, kv_dtype):
    """--kv-cache-dtype fp8_*: bf16 q, K/V stored into and read back from an fp8 pool (decode: split
    along the sequence, and with rotary and the store inside the kernel)."""
    run_step(mode, prefix_lens, ext_lens, 16, 8, 64, torch.bfloat16, kv_dtype=kv_dtype)
    if mode.is_decode:
        run_step(mode, prefix_lens, ext_lens, 16, 8, 64, torch.bfloat16, kv_dtype=kv_dtype, rotary=True)


def test_triton_decode_tiles_read_the_same_bytes_over_an_fp8_pool():
    """decode_block_n counts positions of a 2-byte pool; a 1-byte one reads twice as many an
    iteration (H100, batch 512 x 1280 tokens: 0.72 -> 0.58 ms a layer), shared memory allowing."""
    cfg = KernelConfig(decode_block_n=64, decode_num_stages=2, shared_memory_bytes=228 * 1024)
    assert cfg.decode_tiles(128, 2) == (64, 2) and cfg.decode_tiles(128, 1) == (128, 2)
    small = KernelConfig(decode_block_n=64, decode_num_stages=2, shared_memory_bytes=48 * 1024)
    assert small.decode_tiles(128, 1) == (128, 1)     # 2 stages of 2 x 128 x 128 bytes would not fit
    backend = make_setup(16, 8, 64, torch.bfloat16, 1, kv_dtype=torch.float8_e4m3fn, config=SMALL)[0]
    assert backend.decode_block_n == 2 * SMALL.decode_block_n


@pytest.mark.parametrize("config", [SMALL, KernelConfig(max_kv_splits=1)], ids=["split", "no-split"])
@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, None), (torch.bfloat16, torch.float8_e4m3fn)],
                         ids=["fp32", "bf16-fp8-pool"])
def test_triton_mixed_step_decodes_its_last_requests(config, dtype, kv_dtype):
    """A mixed-chunk step: two prompts (one over a cached prefix) take the extend kernel, the last
    three requests a token each over contexts of 1 to 300 tokens take the decode kernel."""
    run_step(ForwardMode.EXTEND, [5, 0, 300, 0, 47], [9, 40, 1, 1, 1], 16, 8, 64, dtype, config,
             kv_dtype=kv_dtype, mixed_decodes=3)


def test_triton_extend_long_prompt_with_prefix_crosses_blocks():
    run_step(ForwardMode.EXTEND, [70, 0], [45, 90], 8, 4, 64, torch.float32)


def test_triton_decode_split_count_follows_batch_size():
    backend = make_setup(1, 8, 64, torch.float32, 1, config=KernelConfig(num_compute_units=132))[0]
    # about two programs per compute unit: ceil(2 * 132 / (B * 2 KV heads)), a power of two, at most 16
    assert [backend.splits_for(b) for b in (1, 8, 64, 256)] == [16, 16, 4, 1]
    backend.reserve(8)
    size = backend._partial_lse.numel()
    backend.init_forward_metadata(ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=8, input_ids=torch.zeros(8, dtype=torch.int64),
        positions=torch.zeros(8, dtype=torch.int64), req_pool_indices=torch.zeros(8, dtype=torch.int64),
        seq_lens=torch.ones(8, dtype=torch.int64), out_cache_loc=torch.zeros(8, dtype=torch.int64),
        seq_lens_cpu=[1] * 8))
    assert backend._partial_lse.numel() == size  # reserved: no reallocation within the reserved sizes


def test_triton_extend_then_decode_in_sequence_reads_what_was_written():
    backend, pool, req_to_token, rows, g = make_setup(4, 4, 64, torch.float32, 1)
    check_steps_in_sequence(backend, req_to_token, rows, g, [
        (ForwardMode.EXTEND, 0, 6), (ForwardMode.EXTEND, 6, 21), (ForwardMode.DECODE, 27, 1),
        (ForwardMode.DECODE, 28, 1)])


# ---- sliding window ----------------------------------------------------------------------------
# contexts of up to 300 positions in pages of 16 and blocks of 16 (SMALL): a window of 5 or 40
# leaves whole pages and blocks before it unread, and splits only what it covers; 1000 covers all
@pytest.mark.parametrize("window", [1, 5, 40, 1000])
@pytest.mark.parametrize("config", [SMALL, KernelConfig(max_kv_splits=1)], ids=["split", "no-split"])
@pytest.mark.parametrize("rotary", [False, True], ids=["rotated", "rotary-in-kernel"])
def test_triton_decode_sliding_window(window, config, rotary):
    run_step(ForwardMode.DECODE, [300, 0, 129, 47], [1, 1, 1, 1], 16, 8, 64, torch.float32, config,
             rotary=rotary, sliding_window=window)


# blocks of 32 queries over blocks of 16 keys (as on GPUs: 128 x 64): with a small window, the last
# rows of a query block see no key of its first key block
TALL = KernelConfig(extend_block_m=32, extend_block_n=16, decode_block_n=16, min_split_tokens=16)


@pytest.mark.parametrize("window", [1, 5, 23, 1000])
@pytest.mark.parametrize("page_size, config", [(1, SMALL), (8, SMALL), (4, TALL)], ids=["p1", "p8", "p4-tall"])
def test_triton_extend_sliding_window(window, page_size, config):
    """Prompts over cached prefixes and without, longer and shorter than the window and than a
    block of queries."""
    run_step(ForwardMode.EXTEND, [70, 0, 9, 33], [45, 90, 3, 1], page_size, 4, 64, torch.float32, config,
             sliding_window=window)


@pytest.mark.parametrize("window", [3, 20])
def test_triton_mixed_step_sliding_window(window):
    """Prompts on the extend kernel and the decoding requests on the decode kernel, both windowed."""
    run_step(ForwardMode.EXTEND, [5, 0, 300, 0, 47], [9, 40, 1, 1, 1], 16, 8, 64, torch.float32, SMALL,
             mixed_decodes=3, sliding_window=window)


@pytest.mark.parametrize("mode, prefix_lens, ext_lens", [
    (ForwardMode.EXTEND, [5, 17, 0], [9, 1, 20]), (ForwardMode.DECODE, [0, 40, 130], [1, 1, 1])],
    ids=["extend", "decode"])
def test_triton_sliding_window_bf16(mode, prefix_lens, ext_lens):
    run_step(mode, prefix_lens, ext_lens, 16, 8, 64, torch.bfloat16, sliding_window=12)


# ---- KV store ----------------------------------------------------------------------------------
@pytest.mark.parametrize("src_dtype, pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_triton_store_kv_writes_only_the_given_slots(src_dtype, pool_dtype):
    g = torch.Generator().manual_seed(1)
    k_buf = torch.randn(40, 2, 32, generator=g).to(pool_dtype)
    v_buf = torch.randn(40, 2, 32, generator=g).to(pool_dtype)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    loc = torch.randperm(40, generator=g)[:7]
    kv = torch.randn(7, 3 * 64, generator=g).to(src_dtype)           # a fused [q | k | v]-like row
    k, v = kv[:, 64:128].view(7, 2, 32), kv[:, 128:].view(7, 2, 32)  # strided views, as models pass
    store_kv(k_buf, v_buf, loc, k, v)
    k_ref[loc], v_ref[loc] = k.to(pool_dtype), v.to(pool_dtype)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)


@pytest.mark.parametrize("pool_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("rotary", [False, True], ids=["store-kernel", "decode-kernel"])
def test_triton_fp8_stores_saturate(pool_dtype, rotary):
    """Values past the format's range are stored as its largest (not inf or NaN), by the store
    kernel and by the decode kernel that stores the new token's k and v."""
    limit = torch.finfo(pool_dtype).max
    backend, pool, req_to_token, rows, g = make_setup(1, 4, 64, torch.bfloat16, 2, kv_dtype=pool_dtype)
    batch, (q, k, v) = step_inputs(ForwardMode.DECODE, req_to_token, rows, [3, 9], [1, 1], 4, NUM_KV_HEADS, 64,
                                   torch.bfloat16, g)
    k = (k * 1e5).to(torch.bfloat16)
    v = (v * 1e5).to(torch.bfloat16)
    batch.attn_backend, loc = backend, batch.out_cache_loc
    backend.init_forward_metadata(batch)
    if rotary:  # the identity rotation (position 0): k goes in as it is stored
        cos = torch.ones(2, 1, 32, dtype=torch.bfloat16)
        backend.forward(q, k, v, 0, 0.125, batch, cos_sin=(cos, torch.zeros_like(cos)))
    else:
        backend.forward(q, k, v, 0, 0.125, batch)
    for stored, values in ((pool.k_buffers[0][loc], k), (pool.v_buffers[0][loc], v)):
        stored = stored.float()
        big = values.float().abs() > limit
        assert big.sum() > 100 and torch.equal(stored[big], values.float()[big].sign() * limit)
        assert_stored(pool.k_buffers[0][loc] if values is k else pool.v_buffers[0][loc], values)


# ---- fused layer ops -----------------------------------------------------------------------------
OPS_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ops_tolerance(dtype):
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm_matches_torch(dtype, with_residual):
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(7, 96, generator=g)).to(dtype)
    residual = torch.randn(7, 96, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    ours = TritonLayerOps().rms_norm(x, weight, 1e-5, residual)
    ref = TorchLayerOps().rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(ours[1], ref[1], **ops_tolerance(dtype))
        ours, ref = ours[0], ref[0]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **ops_tolerance(dtype))


def test_triton_rms_norm_of_strided_heads():
    """Qwen3's per-head q norm: a [T, H, D] view into the fused qkv output."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, generator=g)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    weight = 1 + 0.1 * torch.randn(16, generator=g)
    torch.testing.assert_close(TritonLayerOps().rms_norm(q, weight, 1e-6), TorchLayerOps().rms_norm(q, weight, 1e-6),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", OPS_DTYPES)
def test_triton_silu_and_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(6, 2 * 80, generator=g)).to(dtype)
    torch.testing.assert_close(TritonLayerOps().silu_and_mul(x), TorchLayerOps().silu_and_mul(x),
                               **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
def test_triton_gelu_tanh_and_mul_matches_torch(dtype):
    """Gemma's GeGLU, with gates far out on both tails (the sigmoid form's exp overflows there)."""
    g = torch.Generator().manual_seed(14)
    x = 3 * torch.randn(6, 2 * 80, generator=g)
    x[0, :4] = torch.tensor([-60.0, -12.0, 12.0, 60.0])
    x = x.to(dtype)
    ours, ref = TritonLayerOps().gelu_tanh_and_mul(x), TorchLayerOps().gelu_tanh_and_mul(x)
    assert ours.dtype == ref.dtype == dtype and ours.shape == (6, 80)
    torch.testing.assert_close(ours, ref, **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
def test_triton_gemma_rms_norm_matches_torch(dtype):
    """Gemma's norm on [T, H, D] heads strided in a fused qkv output: scale 1 + w, one rounding."""
    g = torch.Generator().manual_seed(15)
    qkv = (3 * torch.randn(5, 4 * 32 + 2 * 2 * 32, generator=g)).to(dtype)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    weight = (0.5 * torch.randn(32, generator=g)).to(dtype)
    ours, ref = TritonLayerOps().gemma_rms_norm(q, weight, 1e-6), TorchLayerOps().gemma_rms_norm(q, weight, 1e-6)
    assert ours.dtype == ref.dtype == dtype and ours.shape == q.shape
    torch.testing.assert_close(ours, ref, **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_triton_rotary_matches_torch(dtype, head_dim):
    """q and k as the models pass them (views into the fused qkv output); cos/sin from the layer."""
    from engine.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(5)
    hq, hkv, t = 4, 2, 9
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, generator=g).to(dtype)
    q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hkv) * head_dim].view(t, hkv, head_dim)
    rope = RotaryEmbedding(head_dim, 64, 10000.0)
    cos, sin = rope.cos_sin(torch.randint(0, 64, (t,), generator=g), dtype)
    before = qkv.clone()
    ours, ref = TritonLayerOps().apply_rotary(q, k, cos, sin), TorchLayerOps().apply_rotary(q, k, cos, sin)
    assert torch.equal(qkv, before)  # inputs untouched
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("rows,n,k,silu,bias,block_n,block_k", [
    (1, 64, 256, False, False, 8, 128),     # even tiles
    (1, 50, 200, True, True, 8, 128),       # ragged N and K, SiLU-and-mul input, bias
    (1, 96, 384, True, False, 16, 512),     # block_k wider than K
    (3, 50, 200, False, True, 8, 128),      # several rows: the tile kernel
    (1, 7, 33, False, True, 4, 16),
])
def test_triton_gemv_matches_torch(dtype, rows, n, k, silu, bias, block_n, block_k):
    from backends.triton.gemv import gemv

    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, 2 * k if silu else k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ours = gemv(x, w, b, silu_mul_input=silu, block_n=block_n, block_k=block_k)
    ref = TorchLayerOps().linear(x, w, b, silu_mul_input=silu)
    assert ours.dtype == ref.dtype and ours.shape == (rows, n)
    torch.testing.assert_close(ours, ref, **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("rows,n,k,norm,residual,bias,block_n,block_k", [
    (1, 64, 256, True, False, False, 8, 128),     # the q/k/v and gate/up projections: the norm folded in
    (1, 64, 256, False, True, False, 8, 128),     # the o projection: the residual added
    (1, 50, 200, True, False, True, 8, 128),      # ragged N and K, bias
    (3, 50, 200, False, True, True, 8, 128),      # several rows (the tile kernel): residual and bias
    (2, 7, 33, False, True, True, 4, 16),
])
def test_triton_gemv_norm_and_residual_match_torch(dtype, rows, n, k, norm, residual, bias, block_n, block_k):
    from backends.triton.gemv import gemv

    g = torch.Generator().manual_seed(10)
    x = (3 * torch.randn(rows, k, generator=g)).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    norm_w = (1 + 0.5 * torch.randn(k, generator=g)).to(dtype)
    ref_ops = TorchLayerOps()
    if norm:
        ours = gemv(x, w, b, norm=(norm_w, 1e-5), block_n=block_n, block_k=block_k)
        ref = ref_ops.rms_norm_linear(x, norm_w, 1e-5, w, b)
    else:
        ours = gemv(x, w, b, residual=r, block_n=block_n, block_k=block_k)
        ref = ref_ops.linear(x, w, b, residual=r)
    assert ours.dtype == ref.dtype and ours.shape == (rows, n)
    torch.testing.assert_close(ours, ref, **ops_tolerance(dtype))


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("rows,n,k,residual,bias,tile_n,tile_k", [
    (2, 64, 256, False, False, 16, 64),     # even tiles, one block of 16 rows
    (3, 50, 200, True, True, 16, 64),       # ragged N and K, residual, bias
    (16, 96, 128, False, True, 32, 128),    # a full block of 16 rows
    (17, 40, 96, True, True, 16, 32),       # a 32-row block, 15 rows masked
    (70, 48, 80, True, False, 16, 16),      # three 32-row blocks, K not a multiple of the tile
    (6, 7, 33, True, False, 16, 256),       # tile_k wider than K
])
def test_triton_gemv_several_rows_match_torch(dtype, rows, n, k, residual, bias, tile_n, tile_k):
    """More than one row goes through the tensor-core tile kernel; its epilogues (bias, residual)
    against an fp32 reference, and rows alone through the one-row kernel."""
    from backends.triton.gemv import gemv

    g = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, k, generator=g)).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    launch = dict(block_n=4, block_k=16, tile_n=tile_n, tile_k=tile_k)
    ours = gemv(x, w, b, residual=r, **launch)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    ref = ref if r is None else ref + r.float()
    assert ours.dtype == x.dtype and ours.shape == (rows, n)
    # one rounding of the output in x's dtype
    ulps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours.float(), ref, atol=ulps * ref.abs().max().item(), rtol=ulps)
    some = sorted({0, rows // 2, rows - 1})
    one = torch.cat([gemv(x[i:i + 1], w, b, residual=None if r is None else r[i:i + 1], **launch) for i in some])
    torch.testing.assert_close(ours[some].float(), one.float(), atol=2 * ulps * ref.abs().max().item(),
                               rtol=2 * ulps)


def test_triton_gemv_tile_rows_take_silu_and_norm_from_the_layer_ops():
    """The tile kernel takes no SiLU-and-mul input or norm: gemv says so, and for those rows the
    layer ops run silu_and_mul or rms_norm first, so linear() and rms_norm_linear() still match."""
    from backends.triton.gemv import ROW_KERNEL_MAX_ROWS, gemv

    g = torch.Generator().manual_seed(12)
    rows = ROW_KERNEL_MAX_ROWS + 2
    x, w = torch.randn(rows, 96, generator=g), torch.randn(40, 48, generator=g) / 7
    r, norm_w = torch.randn(rows, 40, generator=g), torch.rand(48, generator=g) + 0.5
    with pytest.raises(ValueError, match="apply silu_and_mul or rms_norm first"):
        gemv(x, w, silu_mul_input=True)
    with pytest.raises(ValueError, match="apply silu_and_mul or rms_norm first"):
        gemv(x[:, :48], w, norm=(norm_w, 1e-6))
    ops = TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=16, gemv_tile_n=16, gemv_tile_k=32))
    ref = TorchLayerOps()
    torch.testing.assert_close(ops.linear(x, w, silu_mul_input=True, residual=r),
                               ref.linear(x, w, silu_mul_input=True, residual=r), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rms_norm_linear(x[:, :48], norm_w, 1e-6, w),
                               ref.rms_norm_linear(x[:, :48], norm_w, 1e-6, w), atol=1e-5, rtol=1e-5)


def test_triton_rms_norm_linear_folds_the_norm_only_into_the_gemv(monkeypatch):
    import backends.triton.layer_ops as layer_ops

    calls = []
    real = layer_ops.gemv
    monkeypatch.setattr(layer_ops, "gemv", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(11)
    w, norm_w = torch.randn(24, 80, generator=g), torch.rand(80, generator=g) + 0.5
    for fuse in (1, 0):
        ops = TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=2, gemv_block_n=4, gemv_block_k=64,
                                                        gemv_fuse_norm=fuse))
        for rows, used in ((1, True), (2, True), (3, False)):
            calls.clear()
            x = torch.randn(rows, 80, generator=g)
            torch.testing.assert_close(ops.rms_norm_linear(x, norm_w, 1e-6, w),
                                       TorchLayerOps().rms_norm_linear(x, norm_w, 1e-6, w), atol=1e-5, rtol=1e-5)
            assert bool(calls) == used
            # folded into the one-row GEMV only; else the norm kernel, then the GEMV
            assert any("norm" in kw for kw in calls) == (rows == 1 and bool(fuse))


def test_triton_linear_takes_the_gemv_only_for_few_rows(monkeypatch):
    import backends.triton.layer_ops as layer_ops

    calls = []
    real = layer_ops.gemv
    monkeypatch.setattr(layer_ops, "gemv", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    ops = TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=2, gemv_block_n=4, gemv_block_k=64,
                                                    gemv_tile_n=16, gemv_tile_k=32))
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 80, generator=g)
    for rows, used in ((1, True), (2, True), (3, False)):
        calls.clear()
        x = torch.randn(rows, 160, generator=g)
        torch.testing.assert_close(ops.linear(x, w, silu_mul_input=True),
                                   TorchLayerOps().linear(x, w, silu_mul_input=True), atol=1e-5, rtol=1e-5)
        assert bool(calls) == used
    assert calls == [] and TritonLayerOps(kernel_config=KernelConfig()).gemv_max_rows == 0   # off by default
    ops.linear(torch.randn(1, 160, generator=g), w, silu_mul_input=True)
    assert calls[0] == dict(silu_mul_input=True, residual=None, block_n=4, block_k=64, num_warps=4, num_stages=3,
                            tile_n=16, tile_k=32, tile_num_warps=4, tile_num_stages=4,
                            smem_bytes=KernelConfig().shared_memory_bytes, pdl=False)


@pytest.mark.parametrize("dtype", OPS_DTYPES)
@pytest.mark.parametrize("rows,n,k,residual,bias,block_n,block_k,k_per_split", [
    (17, 64, 256, False, False, 32, 64, 8192),   # one split, even tiles
    (40, 50, 200, True, True, 16, 64, 8192),     # ragged N and K, residual, bias
    (128, 96, 512, True, False, 32, 128, 128),   # the most rows, four splits
    (33, 40, 300, True, True, 16, 32, 100),      # three even splits of whole chunks, ragged K
    (5, 7, 33, False, True, 16, 256, 16),        # block_k wider than K: one split after all
])
def test_triton_skinny_gemm_matches_torch(dtype, rows, n, k, residual, bias, block_n, block_k, k_per_split):
    """The one-pass GEMM (W on the MMA's M side, x's rows on its N side; split-K summed in a second
    kernel) against an fp32 reference, bias and residual in its epilogue or in the split sum."""
    from backends.triton.skinny_gemm import skinny_gemm

    g = torch.Generator().manual_seed(rows + k)
    x = (3 * torch.randn(rows, k, generator=g)).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    ours = skinny_gemm(x, w, b, residual=r, block_n=block_n, block_k=block_k, k_per_split=k_per_split,
                       num_stages=2)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    ref = ref if r is None else ref + r.float()
    assert ours.dtype == x.dtype and ours.shape == (rows, n)
    ulps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours.float(), ref, atol=ulps * ref.abs().max().item(), rtol=ulps)


def test_triton_skinny_gemm_refuses_too_many_rows_and_the_wrong_width():
    from backends.triton.skinny_gemm import MAX_ROWS, skinny_gemm

    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_gemm(torch.randn(MAX_ROWS + 1, 32), w)
    with pytest.raises(ValueError, match="needs 32"):
        skinny_gemm(torch.randn(4, 31), w)
    assert skinny_gemm(torch.randn(0, 32), w).shape == (0, 16)
    x = torch.randn(20, 32)     # stages and block_k cut to fit a small shared memory: the same result
    torch.testing.assert_close(skinny_gemm(x, w, block_k=256, smem_bytes=1024), x @ w.T, atol=1e-5, rtol=1e-5)


def test_triton_linear_takes_the_skinny_gemm_between_the_gemv_and_the_blas(monkeypatch):
    """Rows past gemv_max_rows and up to skinny_max_rows go through skinny_gemm (SiLU-and-mul applied
    first), more through the vendor BLAS; the results match the torch layer ops throughout."""
    import backends.triton.layer_ops as layer_ops

    calls = []
    real = layer_ops.skinny.skinny_gemm
    monkeypatch.setattr(layer_ops.skinny, "skinny_gemm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    ops = TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=2, gemv_tile_n=16, gemv_tile_k=32,
                                                    skinny_max_rows=5, skinny_block_n=16, skinny_block_k=32,
                                                    skinny_k_per_split=32, skinny_num_stages=2))
    g = torch.Generator().manual_seed(10)
    w, b = torch.randn(24, 80, generator=g), torch.randn(24, generator=g)
    for rows, used in ((2, False), (3, True), (5, True), (6, False)):
        calls.clear()
        x, r = torch.randn(rows, 160, generator=g), torch.randn(rows, 24, generator=g)
        torch.testing.assert_close(ops.linear(x, w, b, silu_mul_input=True, residual=r.clone()),
                                   TorchLayerOps().linear(x, w, b, silu_mul_input=True, residual=r.clone()),
                                   atol=1e-5, rtol=1e-5)
        assert bool(calls) == used
    assert calls == [] and TritonLayerOps(kernel_config=KernelConfig()).skinny_max_rows == 0   # off by default
    big = TritonLayerOps(kernel_config=KernelConfig(skinny_max_rows=4096))
    assert big.skinny_max_rows == layer_ops.skinny.MAX_ROWS
    with pytest.raises(ValueError, match="skinny_max_rows must be >= 0"):
        KernelConfig(skinny_max_rows=-1)

# ---- a whole model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_triton_tiny_qwen_greedy_tokens_equal_torch_backend(arch, request):
    """Qwen2 (q/k/v bias: the GEMV's bias with the norm folded in) and Qwen3 (per-head q/k norms
    before the rotary that the decode attention kernel applies) through every fused path: the
    GEMV at batch <= 3 with the norms and residual adds, rotary and the KV write in the decode
    kernel."""
    from engine.layers.ops import using_layer_ops
    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    path = request.getfixturevalue(f"{arch}_tiny")
    cfg = ModelConfig.from_pretrained(str(path), dtype="float32")
    torch_model = load_model(cfg, "auto", "cpu")
    with using_layer_ops(TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=3))):
        triton_model = load_model(cfg, "auto", "cpu")
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 4, 13)]
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 8, first_chunk=3)
    assert ModelHarness(triton_model, page_size=4, backend="triton").generate_greedy(prompts, 8, first_chunk=3) == ref
    assert len(set(ref[0])) > 1


def test_triton_tiny_llama_greedy_tokens_equal_torch_backend(llama_tiny):
    """Triton attention and Triton layer ops (interpreter, fp32) against the torch backend and
    torch layer ops: a batch of mixed lengths, prompts extended in two chunks (a cached prefix)."""
    from engine.layers.ops import using_layer_ops
    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    cfg = ModelConfig.from_pretrained(str(llama_tiny), dtype="float32")
    torch_model = load_model(cfg, "auto", "cpu")
    with using_layer_ops(TritonLayerOps()):
        triton_model = load_model(cfg, "auto", "cpu")
    # decode steps of 3 rows run every linear through the GEMV, with SiLU-and-mul in the down projection
    with using_layer_ops(TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=3))):
        gemv_model = load_model(cfg, "auto", "cpu")
    assert type(triton_model.model.layers[0].mlp.down_proj.layer_ops).__name__ == "TritonLayerOps"
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (11, 5, 17)]
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 10, first_chunk=3)
    ours = ModelHarness(triton_model, page_size=4, backend="triton").generate_greedy(prompts, 10, first_chunk=3)
    assert ours == ref
    assert len(set(ours[0])) > 1
    assert ModelHarness(gemv_model, page_size=4, backend="triton").generate_greedy(prompts, 10, first_chunk=3) == ref


def test_triton_tiny_mistral_with_a_sliding_window_equals_torch_backend(make_tiny, tmp_path):
    """The tiny Mistral with a window of 8: prompts of 5 to 30 tokens extended in two chunks, and 16
    decode steps, all past the window, through the Triton kernels (rotary in the decode kernel)."""
    import json
    import shutil

    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    shutil.copytree(make_tiny("mistral"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="float32")
    assert cfg.layer_sliding_windows == (8, 8)
    model = load_model(cfg, "auto", "cpu")
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (20, 5, 30)]
    ref = ModelHarness(model, page_size=4).generate_greedy(prompts, 16, first_chunk=3)
    assert ModelHarness(model, page_size=4, backend="triton").generate_greedy(prompts, 16, first_chunk=3) == ref
    assert len(set(ref[0])) > 1


def test_triton_tiny_gemma3_greedy_tokens_equal_torch_backend(make_tiny):
    """Gemma 3 (window of 8 on 3 of 4 layers, local and global rope, Gemma's norms and GeGLU) on the
    Triton layer ops and attention, prompts past the window extended in two chunks, 12 decode steps
    (3 rows: the GEMV path)."""
    from engine.layers.ops import using_layer_ops
    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    cfg = ModelConfig.from_pretrained(str(make_tiny("gemma3")), dtype="float32")
    torch_model = load_model(cfg, "auto", "cpu")
    with using_layer_ops(TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=3))):
        triton_model = load_model(cfg, "auto", "cpu")
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(7, 2000, (n,), generator=g).tolist() for n in (20, 6, 27)]
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 12, first_chunk=3)
    assert ModelHarness(triton_model, page_size=4, backend="triton").generate_greedy(prompts, 12, first_chunk=3) == ref
    assert len(set(ref[0])) > 1
