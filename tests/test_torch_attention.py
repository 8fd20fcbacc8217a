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


def reference_attention(q, k_all, v_all, prefix_lens, ext_lens, scaling):
    """Loops over requests and query tokens in fp64. q: [T, Hq, D] packed; k_all[i], v_all[i]:
    [seq_len_i, Hkv, D] every key of request i (prefix then new)."""
    outs = []
    t0 = 0
    for i, (p, n) in enumerate(zip(prefix_lens, ext_lens)):
        group = q.shape[1] // k_all[i].shape[1]
        k = k_all[i].double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v_all[i].double().repeat_interleave(group, dim=1)
        for j in range(n):
            qi = q[t0 + j].double()                            # [Hq, D]
            keys, vals = k[: p + j + 1], v[: p + j + 1]        # causal: positions 0 .. p + j
            scores = torch.einsum("hd,shd->hs", qi, keys) * scaling
            outs.append(torch.einsum("hs,shd->hd", scores.softmax(-1), vals))
        t0 += n
    return torch.stack(outs)


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


def run_step(mode, prefix_lens, ext_lens, page_size, num_q_heads, head_dim, dtype, layer_id=1, kv_dtype=None):
    backend, pool, req_to_token, rows, g = make_setup(page_size, num_q_heads, head_dim, dtype,
                                                      batch_size=len(prefix_lens), kv_dtype=kv_dtype)
    seq_lens = [p + n for p, n in zip(prefix_lens, ext_lens)]
    batch, (q, k, v) = step_inputs(mode, req_to_token, rows, prefix_lens, ext_lens, num_q_heads, NUM_KV_HEADS,
                                   head_dim, dtype, g)
    batch.attn_backend, loc = backend, batch.out_cache_loc
    scaling = head_dim ** -0.5
    backend.init_forward_metadata(batch)
    out = backend.forward(q, k, v, layer_id, scaling, batch)

    # the new K/V landed at out_cache_loc (rounded into an fp8 pool as torch casts, saturating)
    assert torch.equal(pool.k_buffers[layer_id][loc], to_kv_dtype(k, pool.dtype))
    assert torch.equal(pool.v_buffers[layer_id][loc], to_kv_dtype(v, pool.dtype))
    k_all = [pool.k_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    v_all = [pool.v_buffers[layer_id][req_to_token[r, :s].long()] for r, s in zip(rows, seq_lens)]
    ref = reference_attention(q, k_all, v_all, prefix_lens, ext_lens, scaling)
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
