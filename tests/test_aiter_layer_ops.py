"""aiter's layer ops on ROCm without an AMD GPU: registered exactly where the aiter package is
installed, preferred over Triton on the hip platform when it imports and skipped (with a log line)
when it does not; RMSNorm (with and without the residual add) and SiLU-and-mul through the fake
``aiter`` (fake_aiter.py) against the torch reference, and everything else on the Triton layer ops."""
from __future__ import annotations

import logging
import sys

# The Triton layer ops that AiterLayerOps extends run through Triton's interpreter here, which
# holds only if this process set TRITON_INTERPRET before importing triton (triton_interpret.py).
from triton_interpret import IN_THIS_PROCESS

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import backends.rocm as rocm_backends  # noqa: E402
import backends.triton.layer_ops as triton_layer_ops  # noqa: E402
import hal  # noqa: E402
from backends.cpu.torch_layer_ops import TorchLayerOps  # noqa: E402
from backends.cuda.platform import CudaPlatform  # noqa: E402
from backends.rocm.aiter_layer_ops import AiterLayerOps  # noqa: E402
from backends.rocm.platform import RocmPlatform  # noqa: E402
from backends.triton.layer_ops import TritonLayerOps  # noqa: E402
from fake_aiter import CALLS, fake_aiter, hide_aiter  # noqa: E402
import fake_aiter as fake_aiter_module  # noqa: E402
from hal.kernel_config import KernelConfig  # noqa: E402
from hal.registry import BackendSelectionError, entries  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
REF = TorchLayerOps()


def tolerance(dtype: torch.dtype) -> dict:
    """aiter rounds once where the reference rounds twice: one unit in the last place apart."""
    return {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float32: dict(atol=1e-5, rtol=1e-5)}[dtype]


@pytest.fixture
def aiter(monkeypatch):
    yield from fake_aiter_module.install(monkeypatch)


@pytest.fixture
def registries(monkeypatch):
    yield from fake_aiter_module.isolated_registries(monkeypatch)


# -- registration and selection --------------------------------------------------------------------
def test_without_aiter_no_layer_ops_are_registered_and_rocm_takes_triton(registries, monkeypatch):
    hide_aiter(monkeypatch)
    assert rocm_backends.register_aiter() is False
    assert "aiter" not in entries("layer_ops")
    entry, why = hal.select("layer_ops", RocmPlatform())
    assert entry.name == "triton" and why == "platform preference"


def test_with_aiter_its_layer_ops_register_on_rocm_only_and_are_preferred_there(registries, aiter):
    assert rocm_backends.register_aiter() is True
    assert entries("layer_ops")["aiter"].platforms == {"hip"}
    entry, why = hal.select("layer_ops", RocmPlatform())
    assert entry.name == "aiter" and why == "platform preference"
    assert isinstance(entry.factory(), AiterLayerOps)
    assert hal.select("layer_ops", CudaPlatform())[0].name == "triton"
    assert hal.select("layer_ops", hal.get_platform("cpu"))[0].name == "torch"


@pytest.mark.parametrize("broken", ["import", "missing"])
def test_an_unusable_aiter_is_skipped_for_triton_with_a_log_line(registries, monkeypatch, break_import, caplog,
                                                                 broken):
    """Installed, but failing to import (a HIP library missing) or without silu_and_mul (an old aiter)."""
    monkeypatch.setitem(sys.modules, "aiter", fake_aiter(silu_and_mul=None))
    assert rocm_backends.register_aiter() is True
    if broken == "import":
        monkeypatch.delitem(sys.modules, "aiter")
        break_import("aiter", "libamdhip64.so: cannot open shared object file")
    with caplog.at_level(logging.WARNING, logger="backends.rocm.aiter_import"):
        entry, why = hal.select("layer_ops", RocmPlatform())
    assert entry.name == "triton" and why == "platform preference (aiter unavailable)"
    expected = ("aiter layer ops: aiter is installed but failed to import (ImportError: libamdhip64"
                if broken == "import" else "aiter layer ops: this aiter has no aiter.silu_and_mul")
    assert expected in caplog.text
    with pytest.raises(BackendSelectionError, match="not available in this install; install aiter"):
        hal.select("layer_ops", RocmPlatform(), "aiter")


def test_without_triton_aiter_layer_ops_are_not_available(registries, aiter, monkeypatch):
    """Triton runs every op aiter does not (rotary, linear, other dtypes), so both are needed."""
    monkeypatch.setattr(rocm_backends, "triton_available", lambda: False)
    rocm_backends.register_aiter()
    assert not entries("layer_ops")["aiter"].available()


# -- aiter's ops against the torch reference -------------------------------------------------------
def inputs(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """x, residual [*shape], weight [shape[-1]]: fresh random values, not ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    residual = torch.randn(shape, generator=g).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 128), (1, 4096)])
def test_aiter_rms_norm_matches_torch(aiter, dtype, shape):
    x, _, weight = inputs(dtype, shape, seed=sum(shape))
    x_before = x.clone()
    out = AiterLayerOps().rms_norm(x, weight, 1e-5)
    assert CALLS == ["rms_norm"]
    ref = REF.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 128), (1, 4096)])
def test_aiter_rms_norm_with_residual_matches_torch_and_leaves_its_inputs_alone(aiter, dtype, shape):
    x, residual, weight = inputs(dtype, shape, seed=1 + sum(shape))
    x_before, residual_before = x.clone(), residual.clone()
    out, res_out = AiterLayerOps().rms_norm(x, weight, 1e-6, residual)
    assert CALLS == ["rms_norm_add"]
    ref_out, ref_res = REF.rms_norm(x, weight, 1e-6, residual)
    assert out.dtype == res_out.dtype == dtype and out.shape == res_out.shape == x.shape
    assert torch.equal(res_out, ref_res)                   # x + residual, rounded once, in both
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_aiter_rms_norm_of_strided_heads(aiter):
    """Qwen3's per-head q norm: a [T, H, D] view into the fused qkv output, not contiguous."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, generator=g).to(torch.bfloat16)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    weight = (1 + 0.1 * torch.randn(16, generator=g)).to(torch.bfloat16)
    out = AiterLayerOps().rms_norm(q, weight, 1e-6)
    assert CALLS == ["rms_norm"] and out.shape == q.shape
    torch.testing.assert_close(out, REF.rms_norm(q, weight, 1e-6), **tolerance(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 2 * 80), (2, 3, 2 * 64)])
def test_aiter_silu_and_mul_matches_torch(aiter, dtype, shape):
    g = torch.Generator().manual_seed(4 + shape[-1])
    x = (2 * torch.randn(shape, generator=g)).to(dtype)
    out = AiterLayerOps().silu_and_mul(x)
    assert CALLS == ["silu_and_mul"]
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, REF.silu_and_mul(x), **tolerance(dtype))


def test_aiter_silu_and_mul_of_a_strided_view(aiter):
    g = torch.Generator().manual_seed(5)
    wide = (2 * torch.randn(6, 3 * 80, generator=g)).to(torch.bfloat16)
    x = wide[:, : 2 * 80]                                      # rows 240 apart
    torch.testing.assert_close(AiterLayerOps().silu_and_mul(x), REF.silu_and_mul(x), **tolerance(torch.bfloat16))
    assert CALLS == ["silu_and_mul"]


# -- what stays on Triton --------------------------------------------------------------------------
class Recorder:
    """Stands in for one TritonLayerOps method: records the call and answers with the torch reference."""

    def __init__(self, monkeypatch, method: str) -> None:
        self.calls = 0
        ref = getattr(REF, method)

        def fake(ops, *args, **kw):
            self.calls += 1
            return ref(*args, **kw)

        monkeypatch.setattr(TritonLayerOps, method, fake)


@pytest.mark.parametrize("case", ["float32", "weight of another dtype", "residual of another dtype", "no rows"])
def test_norms_aiter_does_not_take_run_on_triton(aiter, monkeypatch, case):
    triton_rms_norm = Recorder(monkeypatch, "rms_norm")
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    x, residual, weight = inputs(dtype, (0 if case == "no rows" else 5, 64), seed=6)
    if case == "weight of another dtype":
        weight = weight.float()
    if case == "residual of another dtype":
        residual = residual.float()
    with_residual = case != "weight of another dtype"
    out = AiterLayerOps().rms_norm(x, weight, 1e-6, residual if with_residual else None)
    assert CALLS == [] and triton_rms_norm.calls == 1
    ref = REF.rms_norm(x, weight, 1e-6, residual if with_residual else None)
    for ours, theirs in zip(out, ref) if with_residual else [(out, ref)]:
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", ["float32", "no rows"])
def test_silu_and_mul_aiter_does_not_take_runs_on_triton(aiter, monkeypatch, case):
    triton_silu = Recorder(monkeypatch, "silu_and_mul")
    x = torch.randn(0 if case == "no rows" else 3, 64, dtype=torch.float32 if case == "float32" else torch.float16)
    torch.testing.assert_close(AiterLayerOps().silu_and_mul(x), REF.silu_and_mul(x))
    assert CALLS == [] and triton_silu.calls == 1


def test_rotary_runs_on_triton(aiter, monkeypatch):
    triton_rotary = Recorder(monkeypatch, "apply_rotary")
    q, k = torch.randn(3, 4, 16, dtype=torch.bfloat16), torch.randn(3, 2, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(3, 1, 8, dtype=torch.bfloat16), torch.randn(3, 1, 8, dtype=torch.bfloat16)
    AiterLayerOps().apply_rotary(q, k, cos, sin)
    assert triton_rotary.calls == 1 and CALLS == []


def test_linear_runs_on_triton_with_aiters_silu_where_the_gemv_takes_none(aiter, monkeypatch):
    """Few rows: the GEMV with SiLU-and-mul folded in (Triton). Many rows: aiter's SiLU-and-mul,
    then the vendor BLAS."""
    gemv_calls = []
    monkeypatch.setattr(triton_layer_ops, "gemv",
                        lambda x, w, b=None, **kw: gemv_calls.append(kw) or REF.linear(x, w, b, silu_mul_input=True))
    ops = AiterLayerOps(kernel_config=KernelConfig(gemv_max_rows=2))
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 80, generator=g).to(torch.bfloat16)
    for rows, on_gemv in ((1, True), (3, False)):
        gemv_calls.clear()
        CALLS.clear()
        x = torch.randn(rows, 160, generator=g).to(torch.bfloat16)
        torch.testing.assert_close(ops.linear(x, w, silu_mul_input=True), REF.linear(x, w, silu_mul_input=True),
                                   atol=5e-2, rtol=5e-2)
        assert bool(gemv_calls) == on_gemv and CALLS == ([] if on_gemv else ["silu_and_mul"])


def test_rms_norm_linear_folds_into_the_triton_gemv_or_takes_aiters_norm(aiter, monkeypatch):
    gemv_calls = []
    monkeypatch.setattr(triton_layer_ops, "gemv",
                        lambda x, w, b=None, norm=None, **kw: gemv_calls.append(norm)
                        or REF.rms_norm_linear(x, norm[0], norm[1], w, b))
    ops = AiterLayerOps(kernel_config=KernelConfig(gemv_max_rows=1, gemv_fuse_norm=1))
    g = torch.Generator().manual_seed(10)
    w, norm_w = torch.randn(24, 80, generator=g).to(torch.float16), (torch.rand(80, generator=g) + 0.5).half()
    for rows, folded in ((1, True), (4, False)):
        gemv_calls.clear()
        CALLS.clear()
        x = torch.randn(rows, 80, generator=g).to(torch.float16)
        torch.testing.assert_close(ops.rms_norm_linear(x, norm_w, 1e-6, w), REF.rms_norm_linear(x, norm_w, 1e-6, w),
                                   atol=1e-2, rtol=1e-2)
        assert bool(gemv_calls) == folded and CALLS == ([] if folded else ["rms_norm"])


# -- through Triton's interpreter ------------------------------------------------------------------
def test_aiter_layer_ops_in_a_tiny_llama_give_the_torch_tokens(aiter, llama_tiny):
    """A whole model in float16: aiter's norms and SiLU-and-mul (the fake), Triton's rotary kernel
    in the interpreter, against the torch layer ops on the same attention backend. (In bfloat16
    the Triton layer ops alone already flip near-tied greedy tokens of this random model.)"""
    if not IN_THIS_PROCESS:
        pytest.skip("triton was imported before TRITON_INTERPRET was set")
    from engine.layers.ops import using_layer_ops
    from engine.models.config import ModelConfig
    from engine.runner.model_loader import load_model
    from model_harness import ModelHarness

    cfg = ModelConfig.from_pretrained(str(llama_tiny), dtype="float16")
    torch_model = load_model(cfg, "auto", "cpu")
    with using_layer_ops(AiterLayerOps()):
        aiter_model = load_model(cfg, "auto", "cpu")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (11, 5)]
    logits = ModelHarness(aiter_model, page_size=4).extend([0, 1], prompts)
    assert {"rms_norm", "silu_and_mul"} <= set(CALLS)    # (the models add residuals in the o/down projections)
    torch.testing.assert_close(logits, ModelHarness(torch_model, page_size=4).extend([0, 1], prompts),
                               atol=0.25, rtol=1e-2)
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 6)
    assert ModelHarness(aiter_model, page_size=4).generate_greedy(prompts, 6) == ref and len(set(ref[0])) > 1
