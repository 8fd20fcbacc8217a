"""GPU platforms without a GPU: detection from what torch reports (monkeypatched), the vendor
facts each platform answers (fp8 dtype, collectives backend, Triton launch parameters), and
which attention and layer ops are chosen, or refused, on each."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import hal
from backends.cpu.platform import CpuPlatform
from backends.cuda.platform import CudaPlatform
from backends.rocm.platform import RocmPlatform
from backends.xpu.platform import XpuPlatform
from hal.kernel_config import KernelConfig
from hal.platform import DeviceUnavailableError
from hal.registry import BackendSelectionError, entries


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report a GPU build: fake_gpu("cuda") or fake_gpu("hip"), with device properties."""
    def install(kind: str, sms: int = 132, smem: int = 227 * 1024, capability=(9, 0)) -> None:
        monkeypatch.setattr(torch.version, "cuda", "12.4" if kind == "cuda" else None)
        monkeypatch.setattr(torch.version, "hip", "6.2.41133" if kind == "hip" else None, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(
            multi_processor_count=sms, shared_memory_per_block_optin=smem, name="fake"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    return install


def test_rocm_build_is_detected_as_hip(fake_gpu):
    fake_gpu("hip", sms=304, smem=64 * 1024)
    assert hal.get_platform("auto").name == "hip"
    assert hal.get_platform("hip").torch_device_type == "cuda"  # ROCm torch says "cuda" too
    with pytest.raises(DeviceUnavailableError, match="this torch build has no CUDA support"):
        hal.get_platform("cuda")


def test_cuda_build_is_detected_as_cuda(fake_gpu):
    fake_gpu("cuda")
    assert hal.get_platform("auto").name == "cuda"
    with pytest.raises(DeviceUnavailableError, match="this torch build has no ROCm support"):
        hal.get_platform("hip")


def test_xpu_is_detected_when_torch_sees_one(monkeypatch):
    if getattr(torch, "xpu", None) is None:
        pytest.skip("this torch build has no torch.xpu module")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    assert hal.get_platform("auto").name in ("cuda", "hip", "xpu")  # a real NVIDIA/AMD GPU comes first
    assert hal.get_platform("xpu").name == "xpu"


def test_vendor_facts():
    assert CudaPlatform.fp8_dtype == torch.float8_e4m3fn
    assert RocmPlatform.fp8_dtype == torch.float8_e4m3fnuz  # MI300 (CDNA3) uses the fnuz variant
    assert XpuPlatform.fp8_dtype is None
    assert [p.dist_backend for p in (CudaPlatform, RocmPlatform, XpuPlatform, CpuPlatform)] == \
        ["nccl", "nccl", "xccl", "gloo"]  # nccl is RCCL in ROCm builds of torch
    assert CudaPlatform.supports_graphs and RocmPlatform.supports_graphs and not XpuPlatform.supports_graphs


def test_kernel_configs_carry_vendor_values():
    cuda, cdna3, xpu = (CudaPlatform.default_kernel_config, RocmPlatform.default_kernel_config,
                        XpuPlatform.default_kernel_config)
    assert cuda.warp_size == 32 and cdna3.warp_size == 64
    assert cdna3.shared_memory_bytes == 64 * 1024
    assert cdna3.extend_num_stages < cuda.extend_num_stages and cdna3.decode_num_stages < cuda.decode_num_stages
    assert xpu.shared_memory_bytes == 64 * 1024 and xpu.extend_block_m == 64
    # every config's tiles fit its shared memory at the head dims models use
    for cfg in (cuda, cdna3, xpu, CpuPlatform.default_kernel_config):
        for head_dim in (64, 128, 256):
            m, n, stages = cfg.extend_tiles(head_dim, 2)
            assert (m * head_dim + 2 * n * head_dim * stages) * 2 <= cfg.shared_memory_bytes
            assert m >= 16 and n >= 16 and stages >= 1


def test_kernel_config_reads_the_device(fake_gpu):
    fake_gpu("hip", sms=304, smem=64 * 1024)
    cfg = hal.get_platform("hip").kernel_config()
    assert cfg.num_compute_units == 304 and cfg.warp_size == 64 and cfg.shared_memory_bytes == 64 * 1024
    fake_gpu("cuda", sms=132, smem=227 * 1024)
    cfg = hal.get_platform("cuda").kernel_config()
    assert cfg.num_compute_units == 132 and cfg.shared_memory_bytes == 227 * 1024


def test_kernel_config_overrides_reach_the_gpu_platforms(fake_gpu):
    """--kernel-config applies on top of what the device reports (it once did only on the CPU)."""
    from hal.kernel_config import set_overrides

    for kind in ("cuda", "hip"):
        fake_gpu(kind, sms=132, smem=227 * 1024)
        set_overrides({"gemv_max_rows": 1, "min_split_tokens": 32})
        try:
            cfg = hal.get_platform(kind).kernel_config()
        finally:
            set_overrides({})
        assert (cfg.gemv_max_rows, cfg.min_split_tokens, cfg.num_compute_units) == (1, 32, 132)
        assert hal.get_platform(kind).kernel_config().min_split_tokens != 32


@pytest.mark.parametrize("kind,capability,expected", [("cuda", (9, 0), 1), ("cuda", (8, 0), 0), ("hip", (9, 4), 0)])
def test_dependent_launch_only_where_the_device_has_it(fake_gpu, kind, capability, expected):
    from hal.kernel_config import set_overrides

    fake_gpu(kind, capability=capability)
    set_overrides({"pdl": 1})
    try:
        assert hal.get_platform(kind).kernel_config().pdl == expected
    finally:
        set_overrides({})


def test_kernel_config_rejects_bad_tiles():
    with pytest.raises(ValueError, match="max_kv_splits must be a power of two"):
        KernelConfig(max_kv_splits=6)
    with pytest.raises(ValueError, match="extend_block_m must be a power of two >= 16"):
        KernelConfig(extend_block_m=8)


@pytest.mark.parametrize("kind", ["cuda", "hip"])
def test_gpu_platforms_choose_triton_attention_and_layer_ops(fake_gpu, kind):
    pytest.importorskip("triton")
    fake_gpu(kind)
    platform = hal.get_platform(kind)
    for role in ("attention", "layer_ops"):
        entry, why = hal.select(role, platform)
        assert entry.name == "triton" and why == "platform preference"
    assert hal.select("sampling", platform)[0].name == "torch"


def test_without_triton_gpu_platforms_fall_back_to_torch_and_say_why(fake_gpu, monkeypatch):
    fake_gpu("cuda")
    entry = entries("attention")["triton"]
    monkeypatch.setattr(entry, "available", lambda: False)
    chosen, why = hal.select("attention", hal.get_platform("cuda"))
    assert chosen.name == "torch" and "triton unavailable" in why
    with pytest.raises(BackendSelectionError, match="--attention-backend triton: not available in this install; "
                                                    "install triton"):
        hal.select("attention", hal.get_platform("cuda"), "triton")


def test_cpu_keeps_torch_everywhere():
    cpu = hal.get_platform("cpu")
    for role in ("attention", "layer_ops", "sampling"):
        assert hal.select(role, cpu)[0].name == "torch"


def test_triton_attention_on_the_cpu_is_a_clear_error():
    with pytest.raises(BackendSelectionError,
                       match=re.escape("--attention-backend triton: does not run on cpu (runs on cuda, hip, xpu)")):
        hal.select("attention", hal.get_platform("cpu"), "triton")


def test_triton_attention_on_the_cpu_stops_the_model_runner(llama_tiny):
    from engine.runner.model_runner import ModelRunner
    from engine.server_args import ServerArgs

    args = ServerArgs.from_kwargs(model_path=str(llama_tiny), device="cpu", attention_backend="triton")
    with pytest.raises(BackendSelectionError, match="does not run on cpu"):
        ModelRunner(args)


def test_vendor_backends_without_their_package_are_not_registered():
    """FlashInfer and aiter are in the preference lists but register only where their package is
    installed; here neither is, so asking for them names the registered ones instead."""
    import importlib.util

    if importlib.util.find_spec("flashinfer") or importlib.util.find_spec("aiter"):
        pytest.skip("flashinfer or aiter is installed here")
    assert "flashinfer" not in entries("attention") and "aiter" not in entries("attention")
    assert "aiter" not in entries("layer_ops")
    with pytest.raises(BackendSelectionError, match="unknown attention backend; registered: torch, triton"):
        hal.select("attention", hal.get_platform("cpu"), "flashinfer")
