"""Intel: the XPU platform. Attention and layer ops come from the portable Triton kernels
(backends/triton), which need Intel's XPU build of triton."""
from backends.triton import register_for
from backends.xpu.platform import XpuPlatform
from hal.platform import register_platform

register_platform(XpuPlatform)
register_for(XpuPlatform.name)
