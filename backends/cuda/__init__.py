"""NVIDIA: the CUDA platform. Attention and layer ops come from the portable Triton kernels
(backends/triton). Where the flashinfer-python package is installed, FlashInfer's attention and
sampling kernels are registered too, as "flashinfer" (it JIT-compiles them with nvcc on first use);
without it nothing named "flashinfer" is registered and the platform's preference skips the name.
Decode steps are captured as CUDA graphs (graph_runner.py), with either attention backend, unless
--disable-cuda-graph."""
import importlib.util

from backends.cuda.platform import CudaPlatform
from backends.cuda.graph_runner import register_for as register_graph_runner_for
from backends.triton import register_for
from hal.platform import register_platform
from hal.registry import register

register_platform(CudaPlatform)
register_for(CudaPlatform.name)
register_graph_runner_for(CudaPlatform.name)


def _flashinfer_attention(**kw):
    from backends.cuda.flashinfer_attention import FlashInferAttentionBackend

    return FlashInferAttentionBackend(**kw)


def _flashinfer_sampler(**kw):
    from backends.cuda.flashinfer_sampling import FlashInferSampler

    return FlashInferSampler(**kw)


def register_flashinfer() -> bool:
    """Register FlashInfer's attention and sampling on CUDA if the package is installed (found, not
    imported: importing it takes seconds). Returns whether it registered them."""
    if importlib.util.find_spec("flashinfer") is None:
        return False
    register("attention", "flashinfer", _flashinfer_attention, platforms=(CudaPlatform.name,),
             features=("sliding_window",))
    register("sampling", "flashinfer", _flashinfer_sampler, platforms=(CudaPlatform.name,))
    return True


register_flashinfer()
