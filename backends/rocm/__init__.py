"""AMD: the ROCm platform (HIP). Kernels come from backends/triton (and aiter when installed)."""
from backends.rocm.platform import RocmPlatform
from hal.platform import register_platform

register_platform(RocmPlatform)
