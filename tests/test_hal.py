"""The HAL: platform detection, explicit backend selection, and the one rule."""
import pathlib
import re

import pytest
import torch

import hal
from hal.platform import DeviceUnavailableError
from hal.registry import BackendSelectionError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_platform_is_found_and_auto_picks_an_available_one():
    cpu = hal.get_platform("cpu")
    assert cpu.name == "cpu" and cpu.device().type == "cpu"
    free, total = cpu.memory_info()
    assert 0 < free <= total
    auto = hal.get_platform("auto")
    assert auto.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: this torch build has no CUDA support"),
    ("hip", "--device hip: this torch build has no ROCm support"),
])
def test_missing_device_is_a_clear_error(device, message):
    if device == "cuda" and torch.version.cuda is not None:
        message = "--device cuda: torch has CUDA support but sees no NVIDIA GPU"
    with pytest.raises(DeviceUnavailableError, match=re.escape(message)):
        hal.get_platform(device)


def test_unknown_device():
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        hal.get_platform("tpu")


def test_selection_is_explicit_and_never_falls_back():
    cpu = hal.get_platform("cpu")
    entry, why = hal.select("attention", cpu)
    assert entry.name == "torch" and "preference" in why
    with pytest.raises(BackendSelectionError, match="unknown attention backend"):
        hal.select("attention", cpu, "nonexistent")


def test_no_vendor_names_in_engine():
    pattern = re.compile(r"torch\.(cuda|xpu)\b|torch\.version\.(hip|cuda)|^\s*(from|import) backends|"
                         r"['\"](cuda|hip|xpu|rocm|nccl|rccl)['\"]|\b(nvidia|amd|intel)\b", re.I | re.M)
    hits = []
    for path in (ROOT / "engine").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "vendor names inside engine/ (see DESIGN.md, the rule of the HAL):\n" + "\n".join(hits)


def test_linear_with_residual_writes_the_sum_over_the_residual():
    """The residual add happens in the matmul (addmm) and, where the residual is a plain tensor the
    caller gives up, in place: the same numbers as the out-of-place addmm, without its copy."""
    from backends.cpu.torch_layer_ops import TorchLayerOps

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 24, generator=g), torch.randn(16, 24, generator=g)
    r = torch.randn(5, 16, generator=g)
    want = torch.addmm(r, x, w.t())
    out = TorchLayerOps().linear(x, w, residual=r)
    assert torch.equal(out, want) and out.data_ptr() == r.data_ptr()
    # a strided residual is read, not written
    wide = torch.randn(5, 32, generator=g)
    strided = wide[:, ::2]
    before = wide.clone()
    out = TorchLayerOps().linear(x, w, residual=strided)
    assert torch.equal(out, torch.addmm(before[:, ::2], x, w.t())) and torch.equal(wide, before)
