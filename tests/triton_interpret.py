"""Import first in a test module whose Triton kernels run under the interpreter.

triton.jit (and triton's own library of jit functions) reads TRITON_INTERPRET when a function is
defined. If another test module imported triton first, this process cannot interpret kernels:
such a module's tests then run in a fresh process with the variable set, through the pair that
``fresh_process_tests`` returns.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IN_THIS_PROCESS = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if IN_THIS_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"


def fresh_process_tests(module_file: str, test_name: str):
    """(autouse fixture, test function named ``test_name``) for the module at ``module_file``:
    where this process cannot interpret kernels, the fixture skips every other test of the
    module and the test runs the whole module in a fresh process; elsewhere the test skips."""

    @pytest.fixture(autouse=True)
    def _interpreter_process(request):
        if not IN_THIS_PROCESS and request.node.name != test_name:
            pytest.skip(f"triton was imported before TRITON_INTERPRET was set; runs in {test_name}")

    def fresh_process_test():
        if IN_THIS_PROCESS:
            pytest.skip("the kernel tests run in this process")
        root = Path(module_file).resolve().parents[1]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                              cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]

    fresh_process_test.__name__ = test_name
    return _interpreter_process, fresh_process_test
