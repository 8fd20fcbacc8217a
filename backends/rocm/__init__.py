"""AMD: the ROCm platform (HIP). Attention and layer ops come from the portable Triton kernels
(backends/triton) with CDNA3 launch parameters. Where the aiter package (github.com/ROCm/aiter) is
installed, its attention and its fused element-wise layer ops (RMSNorm with and without the
residual add, SiLU-and-mul) are registered too, each as "aiter", which the platform prefers
(aiter_attention.py and aiter_layer_ops.py say what still runs on Triton); aiter is imported only
when the hip platform selects one of them, and an install that fails to import is skipped for
Triton. Without aiter nothing named "aiter" is registered. Decode steps are captured as HIP graphs
by the CUDA folder's graph runner (ROCm's torch has the same graph API)."""
import importlib.util

from backends.rocm.platform import RocmPlatform
from backends.cuda.graph_runner import register_for as register_graph_runner_for
from backends.triton import register_for, triton_available
from hal.platform import register_platform
from hal.registry import register

AITER_REQUIRES = "aiter (github.com/ROCm/aiter; pip install amd-aiter) and triton"

register_platform(RocmPlatform)
register_for(RocmPlatform.name)
register_graph_runner_for(RocmPlatform.name)


def _aiter_attention(**kw):
    from backends.rocm.aiter_attention import AiterAttentionBackend

    return AiterAttentionBackend(**kw)


def _aiter_layer_ops(**kw):
    from backends.rocm.aiter_layer_ops import AiterLayerOps

    return AiterLayerOps(**kw)


def aiter_available() -> bool:
    """aiter imports and has what the backend calls; Triton runs what aiter does not."""
    from backends.rocm.aiter_attention import aiter_importable

    return triton_available() and aiter_importable()


def aiter_layer_ops_available() -> bool:
    """As aiter_available, for the layer ops (which extend Triton's: checked first, as importing
    them imports triton)."""
    if not triton_available():
        return False
    from backends.rocm.aiter_layer_ops import aiter_importable

    return aiter_importable()


def aiter_installed() -> bool:
    try:
        return importlib.util.find_spec("aiter") is not None
    except ValueError:  # in sys.modules without a spec
        return True


def register_aiter() -> bool:
    """Register aiter's attention and layer ops on ROCm if the package is installed (found, not
    imported: that waits until the hip platform selects them). Returns whether it registered them."""
    if not aiter_installed():
        return False
    register("attention", "aiter", _aiter_attention, platforms=(RocmPlatform.name,),
             available=aiter_available, requires=AITER_REQUIRES)
    register("layer_ops", "aiter", _aiter_layer_ops, platforms=(RocmPlatform.name,),
             available=aiter_layer_ops_available, requires=AITER_REQUIRES)
    return True


register_aiter()
