"""Phi-3 through the Triton attention backend and layer ops on the CPU (Triton's interpreter), against
the torch ones: longrope over whole heads (rotated in the decode kernel, cos/sin carrying the
attention factor) and partial rotary (the layer rotates the first rotary_dim dims with the layer ops'
rotary kernel on strided slices, and the backend gets q and k already rotated)."""
from __future__ import annotations

from triton_interpret import fresh_process_tests  # first: sets TRITON_INTERPRET

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from backends.triton.layer_ops import TritonLayerOps  # noqa: E402
from engine.layers.ops import using_layer_ops  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.runner.model_loader import load_model  # noqa: E402
from hal.kernel_config import KernelConfig  # noqa: E402
from model_harness import ModelHarness  # noqa: E402
from test_phi3 import _partial_rotary, edited_copy  # noqa: E402

_interpreter_process, test_phi3_triton_in_a_fresh_process = fresh_process_tests(
    __file__, "test_phi3_triton_in_a_fresh_process")


@pytest.mark.parametrize("partial", [False, True], ids=["longrope", "partial-rotary"])
def test_triton_greedy_tokens_equal_the_torch_backend(make_tiny, tmp_path, partial):
    """Prompts extended in two chunks, then decode steps of 3 rows (the GEMV path) in float32."""
    path = edited_copy(make_tiny("phi3"), tmp_path, _partial_rotary if partial else None)
    cfg = ModelConfig.from_pretrained(path, dtype="float32")
    assert cfg.rotary_dim == (12 if partial else 16)
    torch_model = load_model(cfg, "auto", "cpu")
    with using_layer_ops(TritonLayerOps(kernel_config=KernelConfig(gemv_max_rows=3))) as ops:
        triton_model = load_model(cfg, "auto", "cpu")
    rotary_calls = []
    real = ops.apply_rotary
    ops.apply_rotary = lambda q, k, *a: rotary_calls.append((q.shape[0], q.shape[-1], q.stride(1))) or real(q, k, *a)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(8, 2000, (n,), generator=g).tolist() for n in (11, 5, 17)]
    ref = ModelHarness(torch_model, page_size=4).generate_greedy(prompts, 8, first_chunk=3)
    harness = ModelHarness(triton_model, page_size=4, backend="triton")
    assert harness.generate_greedy(prompts, 8, first_chunk=3) == ref
    assert len(set(ref[0])) > 1
    decode_calls = [c for c in rotary_calls if c[0] == 3]
    if partial:     # every step rotates in the layer: 12 of each head's 16 dims, read in place
        assert decode_calls and all(c[1:] == (12, 16) for c in rotary_calls)
    else:           # extend steps only: decode steps rotate inside the attention kernel
        assert rotary_calls and not decode_calls
