#!/usr/bin/env bash
# The GPU-marked tests, run on the GPU machine from the checkout: Triton kernels at
# Llama-3.1-8B shapes, fused layer ops, decode in a CUDA graph, and the engine against
# transformers. CI (no GPU) skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
import triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, hip {getattr(torch.version, 'hip', None)}), "
      f"triton {triton.__version__}")
if not torch.cuda.is_available():
    raise SystemExit("ci/gpu-tests.sh: torch sees no GPU; these tests need one")
print(f"GPU: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
PY
exec python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs "$@"
