"""Intel: the XPU platform. Kernels come from backends/triton."""
from backends.xpu.platform import XpuPlatform
from hal.platform import register_platform

register_platform(XpuPlatform)
