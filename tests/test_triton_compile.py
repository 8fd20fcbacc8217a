"""The Triton kernels compile for the GPUs we target but do not have here (H100: sm_90, MI300:
gfx942), with the launch parameters of the CUDA and CDNA3 KernelConfigs, at Llama-3.1-8B's
shapes. Runs in a fresh process: the interpreter tests switch this one to TRITON_INTERPRET."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target, triton_backend", [("cuda:90", "nvidia"), ("hip:gfx942", "amd")])
def test_triton_kernels_compile_for(target, triton_backend):
    if importlib.util.find_spec("triton") is None or \
            importlib.util.find_spec(f"triton.backends.{triton_backend}") is None:
        pytest.skip(f"this triton install has no {triton_backend} compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "backends.triton.compile_check", "--target", target],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    from backends.triton.compile_check import FP8_KV, _config, kernel_cases

    # 3 decode attention variants (rotary and the KV store inside or not, one split), the merge
    # kernel, extend, 6 element-wise kernels (Gemma's norm and GELU-and-mul among them), the
    # one-row GEMV (norm folded in, residual added, SiLU-and-mul input with the residual), the
    # tile GEMV (with and without the residual), the fused MoE (the alignment of int64 and int32
    # ids, the two passes at 16-row and the config's largest blocks, the weighted sum); then the 5
    # that touch the KV pool (3 decode, extend, store) again over each of its 2 fp8 formats
    backend = target.split(":")[0]
    fp8 = [kernel_cases(_config(backend), "bf16", 128, kv_dt=t, kv_limit=m) for t, m in FP8_KV[backend].items()]
    assert len(kernel_cases(_config(backend), "bf16", 128)) == 23 and [len(c) for c in fp8] == [5, 5]
    assert proc.stderr.count(": ok") == 33 and proc.stderr.count(" kv=fp8") == 10, proc.stderr[-3000:]
    assert proc.stderr.count("_moe_gemm_kernel bf16") == 4 and proc.stderr.count("_align_kernel bf16") == 2
    assert "_moe_sum_kernel bf16" in proc.stderr
