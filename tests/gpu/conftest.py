"""GPU tests run real Triton kernels: skip them in a process where another test module switched
Triton to its CPU interpreter (it reads TRITON_INTERPRET when kernels are defined)."""
import os

import pytest


@pytest.fixture(autouse=True)
def _compiled_triton():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process; run the GPU tests alone: ci/gpu-tests.sh")
