"""Plain torch implementations: the CPU platform, and the torch attention, sampler and layer ops,
which also run on every other platform as the portable reference."""
from backends.cpu.platform import CpuPlatform
from hal.collectives import SingleProcessCollectives
from hal.platform import register_platform
from hal.registry import register

ALL_PLATFORMS = ("cpu", "cuda", "hip", "xpu")

register_platform(CpuPlatform)


def _attention(**kw):
    from backends.cpu.torch_attention import TorchAttentionBackend

    return TorchAttentionBackend(**kw)


def _sampler(**kw):
    from backends.cpu.torch_sampler import TorchSampler

    return TorchSampler(**kw)


def _layer_ops(**kw):
    from backends.cpu.torch_layer_ops import TorchLayerOps

    return TorchLayerOps(**kw)


register("attention", "torch", _attention, platforms=ALL_PLATFORMS, features=("fp8_kv_cache", "sliding_window"))
register("sampling", "torch", _sampler, platforms=ALL_PLATFORMS)
register("layer_ops", "torch", _layer_ops, platforms=ALL_PLATFORMS)


def _torch_distributed(**kw):
    from backends.cpu.collectives import TorchDistributedCollectives

    return TorchDistributedCollectives(**kw)


register("collectives", "single", lambda **kw: SingleProcessCollectives(), platforms=ALL_PLATFORMS)
register("collectives", "torch_distributed", _torch_distributed, platforms=ALL_PLATFORMS)
