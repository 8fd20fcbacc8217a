"""The torch paged attention backend against a plain per-request reference on random inputs."""
from __future__ import annotations

import pytest
import torch

from attention_case import step_inputs
from backends.cpu.torch_attention import TorchAttentionBackend
from engine.mem_cache.kv_pool import KVPool, to_kv_dtype
from engine.runner.forward_batch import ForwardBatch, ForwardMode

NUM_KV_HEADS = 2
MAX_CONTEXT = 64


def reference_attention(q, k_all, v_all, prefix_lens, ext_lens, scaling, sliding_window=None):
    """Loops over requests and query tokens in fp64. q: [T, Hq, D] packed; k_all[i], v_all[i]:
    [seq_len_i, Hkv, D] every key of request i (prefix then new). With ``sliding_window`` the keys
    a query sees are those transformers' sliding-window causal mask lets through."""
    outs = []
    t0 = 0
    for i, (p, n) in enumerate(zip(prefix_lens, ext_lens)):
        group = q.shape[1] // k_all[i].shape[1]
        k = k_all[i].double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v_all[i].double().repeat_interleave(group, dim=1)
        for j in range(n):
            qi = q[t0 + j].double()                            # [Hq, D]
            seen = visible_keys(p + j, p + n, sliding_window)  # causal: positions 0 .. p + j
            keys, vals = k[seen], v[seen]
            scores = torch.einsum("hd,shd->hs", qi, keys) * scaling
            outs.append(torch.einsum("hs,shd->hd", scores.softmax(-1), vals))
        t0 += n
    return torch.stack(outs)


def visible_keys(q_pos: int, kv_len: int, sliding_window=None) -> torch.Tensor:
    """[kv_len] bool: the key positions a query at ``q_pos`` attends to, by transformers' own mask
    functions (masking_utils), so the reference is its semantics and not a re-derivation."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    fn = causal_mask_function if sliding_window is None else sliding_window_causal_mask_function(sliding_window)
    return fn(0, 0, torch.tensor(q_pos), torch.arange(kv_len))


def make_setup(page_size, num_q_heads, head_dim, dtype, batch_size=3, seed=0, kv_dtype=None):
    """A pool whose pages are handed out in shuffled order, so slots are not contiguous; kv_dtype:
    the pool's, when not the model's (fp8)."""
    g = torch.Generator().manual_seed(seed)
    pages_per_req = MAX_CONTEXT // page_size
    num_pages = batch_size * pages_per_req + 3
    pool = KVPool(num_layers=2, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, dtype=kv_dtype or dtype,
                  device=torch.device("cpu"), num_pages=num_pages, page_size=page_size)
    for buf in pool.k_buffers + pool.v_buffers:  # stale garbage everywhere, not zeros
        buf.copy_(torch.randn(buf.shape, generator=g))
    pages = torch.randperm(num_pages, generator=g)[: batch_size * pages_per_req].view(batch_size, pages_per_req)
    offsets = torch.arange(MAX_CONTEXT)
    max_reqs = 5
    req_to_token = torch.zeros(max_reqs, MAX_CONTEXT, dtype=torch.int32)
    rows = torch.tensor([3, 0, 4][:batch_size])  # request rows need not be 0..B-1
    req_to_token[rows] = (pages[:, offsets // page_size] * page_size + offsets % page_size).int()
    backend = TorchAttentionBackend(num_q_heads=num_q_heads, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim,
                                    kv_pool=pool, req_to_token=req_to_token, page_size=page_size,
                                    dtype=dtype, device=torch.device("cpu"))
    return backend, pool, req_to_token, rows, g


def run_step(mode, prefix_lens, ext_lens, page_size, num_q_heads, head_dim, dtype, layer_id=1, kv_dtype=None,
             sliding_window=None):
    backend, pool, req_to_token, rows, g = make_setup(page_size, num_q_heads, head_dim, dtype,
                                                      batch_size=len(prefix_lens), kv_dtype=kv_dtype)
    seq_lens = [p + n for p, n in zip(prefix_lens, ext_lens)]
    batch, (q, k, v) = step_inputs(mode, req_to_token, rows, prefix_lens, ext_lens, num_q_heads, NUM_KV_HEADS,
                                   head_dim, dtype, g)
    batch.attn_backend, loc = backend, batch.out_cache_loc
    scaling = head_dim ** -0.5
    backend.init_forward_metadata(batch)
    kw = {} if sliding_window is None else dict(sliding_window=sliding_window)
    out = backend.forward(q, k, v, layer_id, scaling, batch, **kw)

    # the new K/V landed at out_cache_loc (rounded into an fp8 pool as torch casts, saturating)
    assert torch.equal(pool.k_buffers[layer_id][loc], to_kv_dtype(k, pool.dtype))
    assert torch.equal(pool.v_buffers[layer_id][loc], to_kv_dtype(v, pool.dtype))
    k_all = [pool.k_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    v_all = [pool.v_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    ref = reference_attention(q, k_all, v_all, prefix_lens, ext_lens, scaling, sliding_window)
    return out, ref


def tolerance(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


CASES = {
    "extend_no_prefix": (ForwardMode.EXTEND, [0, 0, 0], [7, 1, 13]),
    "extend_with_prefix": (ForwardMode.EXTEND, [5, 17, 0], [9, 1, 4]),
    "extend_equal_new_lengths": (ForwardMode.EXTEND, [3, 8, 0], [6, 6, 6]),
    "extend_equal_prefix_and_new": (ForwardMode.EXTEND, [4, 4, 4], [5, 5, 5]),
    "extend_equal_no_prefix": (ForwardMode.EXTEND, [0, 0, 0], [5, 5, 5]),
    "extend_one_token_each": (ForwardMode.EXTEND, [10, 3, 7], [1, 1, 1]),
    "decode": (ForwardMode.DECODE, [0, 20, 33], [1, 1, 1]),
    "decode_equal_lengths": (ForwardMode.DECODE, [9, 9, 9], [1, 1, 1]),
}


def check_case(case, gqa, page_size, head_dim, dtype):
    mode, prefix_lens, ext_lens = CASES[case]
    out, ref = run_step(mode, prefix_lens, ext_lens, page_size, NUM_KV_HEADS * gqa, head_dim, dtype)
    assert out.dtype == dtype and out.shape == (sum(ext_lens), NUM_KV_HEADS * gqa, head_dim)
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_matches_reference_fp32(case, gqa, page_size):
    check_case(case, gqa, page_size, 64, torch.float32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gqa, page_size, head_dim, dtype", [
    (4, 16, 128, torch.float32), (2, 4, 64, torch.bfloat16), (1, 1, 128, torch.bfloat16),
    (4, 4, 128, torch.bfloat16)], ids=["fp32-hd128", "bf16-hd64", "bf16-hd128-mha", "bf16-hd128-gqa4"])
def test_matches_reference_head_dims_and_bf16(case, gqa, page_size, head_dim, dtype):
    check_case(case, gqa, page_size, head_dim, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_matches_reference_over_an_fp8_pool(case, kv_dtype):
    """--kv-cache-dtype fp8_*: the reference attends over what the pool holds, read back in bf16."""
    mode, prefix_lens, ext_lens = CASES[case]
    out, ref = run_step(mode, prefix_lens, ext_lens, 4, NUM_KV_HEADS * 2, 64, torch.bfloat16, kv_dtype=kv_dtype)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_fp8_table_conversion_equals_torch_cast(fp8):
    """from_fp8 (the backend's fast path) gives every one of the 256 values as torch's cast does."""
    from backends.cpu.torch_attention import from_fp8

    every = torch.arange(256, dtype=torch.uint8).view(fp8).view(16, 16)[:, None].expand(16, 3, 16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours, ref = from_fp8(every, dtype), every.to(dtype)
        assert ours.dtype == dtype and ours.shape == ref.shape
        assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours[~ours.isnan()], ref[~ref.isnan()])


def check_steps_in_sequence(backend, req_to_token, rows, g, steps):
    """One request through several extend/decode steps, each reading the K/V the last wrote;
    steps: [(mode, prefix_len, new_tokens)]."""
    row = rows[:1]
    ks, vs, outs, refs = [], [], [], []
    for mode, prefix, n in steps:
        q = torch.randn(n, 4, 64, generator=g)
        k, v = torch.randn(n, NUM_KV_HEADS, 64, generator=g), torch.randn(n, NUM_KV_HEADS, 64, generator=g)
        ks.append(k)
        vs.append(v)
        batch = ForwardBatch(
            mode=mode, batch_size=1, input_ids=torch.zeros(n, dtype=torch.int64),
            positions=torch.arange(prefix, prefix + n), req_pool_indices=row,
            seq_lens=torch.tensor([prefix + n]), out_cache_loc=req_to_token[row[0], prefix:prefix + n].long(),
            seq_lens_cpu=[prefix + n], extend_prefix_lens=torch.tensor([prefix]),
            extend_seq_lens=torch.tensor([n]), extend_prefix_lens_cpu=[prefix], extend_seq_lens_cpu=[n])
        backend.init_forward_metadata(batch)
        outs.append(backend.forward(q, k, v, 0, 0.125, batch))
        refs.append(reference_attention(q, [torch.cat(ks)], [torch.cat(vs)], [prefix], [n], 0.125))
    torch.testing.assert_close(torch.cat(outs).double(), torch.cat(refs), atol=2e-5, rtol=2e-5)


def test_single_request_extend_and_decode_in_sequence():
    """A prompt in two extend chunks, then decodes, each step reading what the last one wrote."""
    backend, pool, req_to_token, rows, g = make_setup(4, 4, 64, torch.float32, batch_size=1)
    check_steps_in_sequence(backend, req_to_token, rows, g, [
        (ForwardMode.EXTEND, 0, 6), (ForwardMode.EXTEND, 6, 5), (ForwardMode.DECODE, 11, 1),
        (ForwardMode.DECODE, 12, 1)])


# ---- sliding window -----------------------------------------------------------------------------
# windows of 1 (a token sees only itself), smaller than most contexts, and larger than all of them
WINDOW_CASES = {
    **CASES,
    "extend_long_prefix_short_new": (ForwardMode.EXTEND, [40, 25, 3], [3, 2, 30]),
    "decode_long_and_short": (ForwardMode.DECODE, [50, 2, 0], [1, 1, 1]),
    "decode_all_past_the_window": (ForwardMode.DECODE, [30, 45, 50], [1, 1, 1]),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("page_size, gqa", [(1, 2), (4, 1), (16, 4)])
def test_sliding_window_matches_masked_reference(case, window, page_size, gqa):
    mode, prefix_lens, ext_lens = WINDOW_CASES[case]
    out, ref = run_step(mode, prefix_lens, ext_lens, page_size, NUM_KV_HEADS * gqa, 64, torch.float32,
                        sliding_window=window)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))


def test_sliding_window_bf16_over_an_fp8_pool():
    for mode, prefix_lens, ext_lens in (WINDOW_CASES["extend_with_prefix"], WINDOW_CASES["decode_long_and_short"]):
        out, ref = run_step(mode, prefix_lens, ext_lens, 4, NUM_KV_HEADS * 2, 64, torch.bfloat16,
                            kv_dtype=torch.float8_e4m3fn, sliding_window=6)
        torch.testing.assert_close(out.double(), ref, **tolerance(torch.bfloat16))


def test_visible_keys_are_the_last_window_positions():
    """The reference's rule (transformers' mask): a query at p sees p - W < j <= p."""
    assert visible_keys(5, 8, 3).nonzero().flatten().tolist() == [3, 4, 5]
    assert visible_keys(1, 8, 3).nonzero().flatten().tolist() == [0, 1]
    assert visible_keys(5, 8, 1).nonzero().flatten().tolist() == [5]
    assert visible_keys(5, 8).nonzero().flatten().tolist() == list(range(6))


def test_layers_of_different_windows_in_one_step():
    """One step, three layers: full, window 4, full again; each gets its own masks."""
    backend, pool, req_to_token, rows, g = make_setup(4, 4, 64, torch.float32)
    prefix_lens, ext_lens = [5, 17, 0], [9, 1, 4]
    batch, (q, k, v) = step_inputs(ForwardMode.EXTEND, req_to_token, rows, prefix_lens, ext_lens, 4,
                                   NUM_KV_HEADS, 64, torch.float32, g)
    backend.init_forward_metadata(batch)
    seq = [p + n for p, n in zip(prefix_lens, ext_lens)]
    for layer_id, window in ((0, None), (1, 4), (0, None)):
        kw = {} if window is None else dict(sliding_window=window)
        out = backend.forward(q, k, v, layer_id, 0.125, batch, **kw)
        k_all = [pool.k_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq)]
        v_all = [pool.v_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq)]
        ref = reference_attention(q, k_all, v_all, prefix_lens, ext_lens, 0.125, window)
        torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))
