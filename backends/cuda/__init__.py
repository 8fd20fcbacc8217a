"""NVIDIA: the CUDA platform. Kernels come from backends/triton (and FlashInfer when installed)."""
from backends.cuda.platform import CudaPlatform
from hal.platform import register_platform

register_platform(CudaPlatform)
