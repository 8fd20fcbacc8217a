"""A fake ``aiter`` for the CPU: the functions anyserve calls, with the semantics of ROCm/aiter's
Python API (argument order, outputs written into the tensors passed, what each checks) in plain
torch. ``fake_aiter()`` builds the module; each call appends what ran to ``CALLS``.
``without_aiter_entries`` keeps a test's ``register_aiter()`` from leaking into later tests."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch

import hal.registry as registry

CALLS: list[str] = []


# -- attention ---------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, Hq, D] the last n queries of a sequence; k, v: [s, Hkv, D]; bottom-right causal."""
    n, s, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    visible = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]          # [n, s]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def _check_index(t: torch.Tensor, name: str) -> None:
    assert t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous(), f"{name} must be int32 1-D"


def paged_attention_ragged(*, out, workspace_buffer, query, key_cache, value_cache, scale, kv_indptr,
                           kv_page_indices, kv_last_page_lens, block_size, max_num_partitions, alibi_slopes,
                           kv_cache_dtype, kv_cache_layout, logits_soft_cap, k_scale, v_scale,
                           fp8_out_scale=None, partition_size=256, mtp=1):
    """aiter's split-K paged decode, NHD cache [num_pages, block_size, Hkv, D], CSR page table."""
    assert kv_cache_layout == "NHD" and kv_cache_dtype == "auto" and alibi_slopes is None
    assert logits_soft_cap == 0.0 and fp8_out_scale is None and mtp == 1 and partition_size == 256
    assert query.dtype in (torch.float16, torch.bfloat16) and out.shape == query.shape
    assert query.stride(1) == query.shape[2] and query.stride(2) == 1
    num_seqs, num_heads, d = query.shape
    assert key_cache.dim() == 4 and key_cache.shape[1] == block_size and key_cache.shape[3] == d
    assert value_cache.shape == key_cache.shape and num_heads % key_cache.shape[2] == 0
    assert k_scale.dtype == torch.float32 and float(k_scale) == 1.0 and float(v_scale) == 1.0
    for t, name in ((kv_indptr, "kv_indptr"), (kv_page_indices, "kv_page_indices"),
                    (kv_last_page_lens, "kv_last_page_lens")):
        _check_index(t, name)
    assert kv_indptr.numel() == num_seqs + 1 and kv_indptr[0] == 0
    pages = kv_indptr[1:] - kv_indptr[:-1]
    if block_size > 1:
        assert ((kv_last_page_lens >= 1) & (kv_last_page_lens <= block_size)).all()
        context = (pages - 1) * block_size + kv_last_page_lens
    else:
        context = pages
    assert int(context.max()) <= max_num_partitions * partition_size
    need = num_seqs * num_heads * max_num_partitions * (d * query.element_size() + 8)
    assert workspace_buffer.dtype == torch.uint8 and workspace_buffer.numel() >= need
    for i in range(num_seqs):
        ids = kv_page_indices[kv_indptr[i]:kv_indptr[i + 1]].long()
        k = key_cache[ids].flatten(0, 1)[: context[i]]
        v = value_cache[ids].flatten(0, 1)[: context[i]]
        out[i] = _attend(query[i:i + 1], k, v, scale)[0]
    CALLS.append("decode")


def mha_batch_prefill_func(q, k, v, cu_seqlens_q, kv_indptr, kv_page_indices, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, logits_soft_cap=0.0, causal=False,
                           window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_lse=False,
                           return_attn_probs=False, out=None):
    """CK's varlen prefill over a paged cache; 3-D K/V is the page-size-1 layout [pages, Hkv, D]."""
    assert causal and dropout_p == 0.0 and logits_soft_cap == 0.0 and tuple(window_size) == (-1, -1)
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    assert k.dim() == 3 and v.shape == k.shape and k.shape[2] == q.shape[2] and q.shape[2] % 8 == 0
    for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (kv_indptr, "kv_indptr"), (kv_page_indices, "kv_page_indices")):
        _check_index(t, name)
    assert cu_seqlens_q.numel() == kv_indptr.numel() and int(cu_seqlens_q[-1]) == q.shape[0]
    q_lens, k_lens = cu_seqlens_q.diff(), kv_indptr.diff()
    assert int(q_lens.max()) <= max_seqlen_q and int(k_lens.max()) <= max_seqlen_k
    out = torch.empty_like(q)
    for i in range(q_lens.numel()):
        ids = kv_page_indices[kv_indptr[i]:kv_indptr[i + 1]].long()
        rows = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        out[rows] = _attend(q[rows], k[ids], v[ids], softmax_scale)
    CALLS.append("extend")
    return out


# -- layer ops (aiter/ops/rmsnorm.py, aiter/ops/activation.py) -----------------------------------------
def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Every tensor a contiguous [rows, hidden] of the input's dtype (aiter's norms take 2-D rows)."""
    assert t.dim() == 2 and t.is_contiguous(), f"{name} must be a contiguous [rows, hidden] tensor"
    assert t.dtype == like.dtype and t.device == like.device, f"{name} must be {like.dtype} like the input"


def _check_norm_args(input: torch.Tensor, weight: torch.Tensor, use_model_sensitive_rmsnorm: int) -> None:
    # the CK norms of older aiter take float16/bfloat16 only (the opus ones of 2026 take float32 too)
    assert input.dtype in (torch.float16, torch.bfloat16), "aiter's norms are float16/bfloat16"
    _check_rows("input", input, input)
    assert weight.dtype == input.dtype and weight.is_contiguous() and weight.shape == input.shape[-1:], \
        "weight must be a contiguous [hidden] of the input's dtype"
    assert use_model_sensitive_rmsnorm == 0


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32: the weight multiplies before the one rounding (to the caller's dtype)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float()


def rmsnorm2d_fwd(input, weight, epsilon, use_model_sensitive_rmsnorm=0):
    """Returns a new tensor: weight * norm(input)."""
    _check_norm_args(input, weight, use_model_sensitive_rmsnorm)
    CALLS.append("rms_norm")
    return _norm(input, weight, epsilon).to(input.dtype)


def rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon, use_model_sensitive_rmsnorm=0):
    """Writes residual_out = input + residual_in (rounded) and out = weight * norm(residual_out);
    returns None and leaves input and residual_in alone."""
    _check_norm_args(input, weight, use_model_sensitive_rmsnorm)
    for name, t in (("out", out), ("residual_in", residual_in), ("residual_out", residual_out)):
        _check_rows(name, t, input)
        assert t.shape == input.shape, f"{name} must be shaped as the input"
    residual_out.copy_(input.float() + residual_in.float())
    out.copy_(_norm(residual_out, weight, epsilon))
    CALLS.append("rms_norm_add")


def silu_and_mul(out, input):
    """Writes out [rows, d] = silu(input[:, :d]) * input[:, d:] (fp32, one rounding); returns None."""
    assert input.dtype in (torch.float16, torch.bfloat16, torch.float32) and out.dtype == input.dtype
    assert input.dim() == 2 and input.is_contiguous(), "the kernel steps rows by 2d: contiguous [rows, 2d]"
    d = input.shape[1] // 2
    assert out.is_contiguous() and out.shape == (input.shape[0], d) and input.shape[1] == 2 * d
    gate, up = input[:, :d].float(), input[:, d:].float()
    out.copy_(gate * torch.sigmoid(gate) * up)
    CALLS.append("silu_and_mul")


LAYER_OPS = dict(rmsnorm2d_fwd=rmsnorm2d_fwd, rmsnorm2d_fwd_with_add=rmsnorm2d_fwd_with_add,
                 silu_and_mul=silu_and_mul)


def fake_aiter(**functions) -> types.ModuleType:
    """The fake module; ``functions`` replace (or, as None, remove) some of its functions."""
    mod = types.ModuleType("aiter")
    mod.__spec__ = importlib.machinery.ModuleSpec("aiter", None)
    mod.__version__ = "fake"
    mod.paged_attention_ragged = paged_attention_ragged
    mod.mha_batch_prefill_func = mha_batch_prefill_func
    for name, fn in {**LAYER_OPS, **functions}.items():
        setattr(mod, name, fn)
    return mod


def without_aiter_entries(monkeypatch) -> None:
    """Every role's registry as it is now minus any "aiter" entry (a real install's), each put back
    after the test, so that the test registers the fake's entries (register_aiter) on its own."""
    registry.entries("attention")          # load the backends first
    for role in registry.ROLES:
        table = {n: e for n, e in registry._REGISTRY[role].items() if n != "aiter"}
        monkeypatch.setitem(registry._REGISTRY, role, table)


def hide_aiter(monkeypatch) -> None:
    """As on a machine without aiter: not imported, and not found by importlib."""
    monkeypatch.delitem(sys.modules, "aiter", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "aiter" else real_find_spec(name, *a, **kw))


def _clear_import_checks() -> None:
    from backends.rocm import aiter_attention, aiter_layer_ops

    aiter_attention.aiter_importable.cache_clear()
    aiter_layer_ops.aiter_importable.cache_clear()


def install(monkeypatch):
    """Fixture body: a working fake aiter importable as ``aiter`` for the test (yields it)."""
    monkeypatch.setitem(sys.modules, "aiter", fake_aiter())
    _clear_import_checks()
    CALLS.clear()
    yield sys.modules["aiter"]
    _clear_import_checks()


def isolated_registries(monkeypatch):
    """Fixture body: the registries as they are now (minus any real aiter entry), restored after."""
    without_aiter_entries(monkeypatch)
    _clear_import_checks()
    yield
    _clear_import_checks()
