"""AMD: the ROCm platform (HIP). Attention and layer ops come from the portable Triton kernels
(backends/triton) with CDNA3 launch parameters. aiter kernels are not wired in yet, so nothing
named "aiter" is registered; the platform's preference skips names that no backend registered.
Decode steps are captured as HIP graphs by the CUDA folder's graph runner (ROCm's torch has the
same graph API)."""
from backends.rocm.platform import RocmPlatform
from backends.cuda.graph_runner import register_for as register_graph_runner_for
from backends.triton import register_for
from hal.platform import register_platform

register_platform(RocmPlatform)
register_for(RocmPlatform.name)
register_graph_runner_for(RocmPlatform.name)
