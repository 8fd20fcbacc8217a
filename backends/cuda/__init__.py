"""NVIDIA: the CUDA platform. Attention and layer ops come from the portable Triton kernels
(backends/triton). FlashInfer is not wired in yet, so nothing named "flashinfer" is registered;
the platform's preference skips names that no backend registered. Decode steps are captured as
CUDA graphs (graph_runner.py), unless --disable-cuda-graph."""
from backends.cuda.platform import CudaPlatform
from backends.cuda.graph_runner import register_for as register_graph_runner_for
from backends.triton import register_for
from hal.platform import register_platform

register_platform(CudaPlatform)
register_for(CudaPlatform.name)
register_graph_runner_for(CudaPlatform.name)
