#!/usr/bin/env bash
# Packs FlashInfer for the GPU machine, which has no network and takes at most 64 MiB of carried
# files: the flashinfer-python wheel (62 MB zipped, 427 MB unpacked) trimmed to what the paged
# decode/extend attention and sampling kernels need, plus apache-tvm-ffi, as one .tar.xz (~13 MiB).
#
#   bash benchmarks/pack_flashinfer.sh FLASHINFER_WHEEL [--tvm-ffi-wheel WHL] [--aot DIR]
#
# writes .flashinfer-carry/ (ignored by git through its own .gitignore):
#   flashinfer-site.tar.xz  the trimmed site-packages tree (flashinfer, tvm_ffi, their dist-info)
#   setup.sh                the device-side unpack: source it from the repo root on the GPU machine
#
# On the GPU machine (carry .flashinfer-carry):
#   source .flashinfer-carry/setup.sh && python3 benchmarks/check_flashinfer.py
#
# What is kept: every Python file of the package (``import flashinfer`` imports ~330 of its
# modules; the ones that need the packages this image lacks -- nvidia-cutlass-dsl, cudnn-frontend,
# cuda-tile, nccl4py -- import them lazily or under try/except), and of data/: csrc's top-level
# sources and templates (the attention, sampling and page modules JIT-compile from them), the
# FlashInfer headers, CUTLASS's include folders (the sm90 FA3 prefill), vendored CCCL and spdlog.
# Dropped: csrc's subfolders (MoE, GDN, KDA, DSv4 and other model-specific kernels, 248 MB) and the
# CUTLASS/CCCL examples, tests and Python packages.
#
# --aot DIR: DIR holds modules a previous device run built (NAME/NAME.so, as check_flashinfer.py
# --export-aot writes them); they go to flashinfer/data/aot/, which FlashInfer loads before it
# would JIT-compile, so a fresh machine skips the minutes of nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
wheel=$1; shift
tvm_wheel=""
aot_dir=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --tvm-ffi-wheel) tvm_wheel=$2; shift 2 ;;
    --aot) aot_dir=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ -f $wheel ]] || { echo "pack_flashinfer: no wheel at $wheel" >&2; exit 1; }
if [[ -z $tvm_wheel ]]; then
  # the device runs python3.12: take the cp312 build of apache-tvm-ffi (the lead keeps it in .wheels/)
  tvm_wheel=$(ls .wheels/apache_tvm_ffi-*-cp312-*.whl 2>/dev/null | sort | tail -n 1 || true)
  if [[ -z $tvm_wheel ]]; then
    echo "pack_flashinfer: no .wheels/apache_tvm_ffi-*-cp312-*.whl; pass --tvm-ffi-wheel" >&2
    exit 1
  fi
fi
[[ -z $aot_dir || -d $aot_dir ]] || { echo "pack_flashinfer: --aot $aot_dir is not a folder" >&2; exit 1; }

out=.flashinfer-carry
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"
printf '*\n' > "$out/.gitignore"

python3 - "$wheel" "$tvm_wheel" "$stage/site" "$aot_dir" <<'PY'
"""Unzip the wheels into a site tree, keeping only what FlashInfer's attention/sampling JIT needs."""
import pathlib
import shutil
import sys
import zipfile

wheel, tvm_wheel, site, aot_dir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
DATA_KEEP = (  # under flashinfer/data/; csrc keeps only its top-level files (see keep())
    "include/", "spdlog/include/", "cutlass/include/", "cutlass/tools/util/include/",
    "cccl/cub/cub/", "cccl/libcudacxx/include/", "cccl/thrust/thrust/",
)


def keep(name: str) -> bool:
    if "__pycache__/" in name or name.endswith(".pyc"):
        return False
    top = name.split("/", 1)[0]
    if top.endswith(".dist-info"):
        return True
    if top != "flashinfer":
        return False                        # b12x/, build_backend.py: not needed at run time
    if not name.startswith("flashinfer/data/"):
        return True                         # the Python package: import flashinfer needs it whole
    rel = name[len("flashinfer/data/"):]
    if rel.startswith("csrc/"):
        return "/" not in rel[len("csrc/"):]
    return rel.startswith(DATA_KEEP)


kept = dropped = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir():
            continue
        if keep(info.filename):
            z.extract(info, site)
            kept += info.file_size
        else:
            dropped += info.file_size
with zipfile.ZipFile(tvm_wheel) as z:
    z.extractall(site)
if aot_dir:
    for so in sorted(pathlib.Path(aot_dir).glob("*/*.so")):
        if so.stem != so.parent.name:
            continue
        dest = site / "flashinfer" / "data" / "aot" / so.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, dest / so.name)
        print(f"  aot module {so.parent.name} ({so.stat().st_size / 2**20:.1f} MiB)")
print(f"flashinfer wheel: kept {kept / 2**20:.0f} MiB, dropped {dropped / 2**20:.0f} MiB (unpacked sizes)")
PY

python3 - "$stage/site" <<'PY'
"""Check the trimming: every header the kept attention/sampling/page sources include (transitively)
that comes from FlashInfer, CUTLASS/CuTe, CCCL, tvm-ffi or spdlog resolves inside the tree. Only
CUDA toolkit and C++ standard headers (from nvcc) and the .inc files FlashInfer generates at JIT
time may stay unresolved."""
import pathlib
import re
import sys

site = pathlib.Path(sys.argv[1])
data = site / "flashinfer" / "data"
dirs = [data / "csrc", data / "include", data / "cccl/cub", data / "cccl/libcudacxx/include",
        data / "cccl/thrust", site / "tvm_ffi/include", data / "cutlass/include",
        data / "cutlass/tools/util/include", data / "spdlog/include"]
roots = [p for p in (data / "csrc").iterdir()
         if p.name.startswith(("batch_decode", "batch_prefill", "sampling", "renorm", "page",
                               "flashinfer_sampling", "flashinfer_page"))
         and "mla" not in p.name and "fp8" not in p.name]
include = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
# headers the sources include only under branches nvcc -std=c++17 never takes (C++20 <=>, NVRTC)
OPTIONAL = re.compile(r"^cuda/std/(__compare/|compare$|__tuple_dir/structured_bindings\.h$|"
                      r"__type_traits/predicate_traits\.h$)")
ours = ("flashinfer/", "cutlass/", "cute/", "tvm/", "dlpack/", "spdlog/", "cub/", "thrust/", "cuda/")
seen, missing, todo = set(), {}, list(roots)
while todo:
    path = todo.pop()
    if path in seen:
        continue
    seen.add(path)
    for name in include.findall(path.read_text(errors="ignore")):
        hit = next((c for c in [path.parent / name] + [d / name for d in dirs] if c.is_file()), None)
        if hit is not None:
            todo.append(hit.resolve())
        elif name.startswith(ours) and not name.endswith(".inc") and not OPTIONAL.match(name):
            missing.setdefault(name, path)
if missing:
    for name, where in sorted(missing.items()):
        print(f"pack_flashinfer: {name} (included by {where.relative_to(site)}) is not in the tree",
              file=sys.stderr)
    sys.exit(1)
print(f"include check: {len(roots)} kernel sources reach {len(seen)} files, none missing")
PY

sha=$(find "$stage/site" -type f -printf '%P %s\n' | sort | sha256sum | cut -c1-16)
echo "$sha" > "$stage/site/.anyserve-stamp"
echo "compressing (xz -9, a minute or two)..."
tar -C "$stage/site" -cf - . | xz -T0 -9 > "$out/flashinfer-site.tar.xz"
echo "$sha" > "$out/stamp"

cat > "$out/setup.sh" <<'SH'
# Source from the repo root on the GPU machine: unpacks the carried FlashInfer (once per machine and
# tarball) and points python3 and FlashInfer's JIT at it. Made by benchmarks/pack_flashinfer.sh.
_fi_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_fi_home=${ANYSERVE_FLASHINFER_HOME:-/tmp/anyserve-flashinfer}
if [ "$(cat "$_fi_home/site/.anyserve-stamp" 2>/dev/null)" != "$(cat "$_fi_here/stamp")" ]; then
  rm -rf "$_fi_home/site" && mkdir -p "$_fi_home/site"
  python3 - "$_fi_here/flashinfer-site.tar.xz" "$_fi_home/site" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
PY
fi
export PYTHONPATH="$_fi_home/site${PYTHONPATH:+:$PYTHONPATH}"
# JIT-built modules go to $_fi_home/.cache/flashinfer/<version>/<arch>/cached_ops/
export FLASHINFER_WORKSPACE_BASE="$_fi_home"
# FlashInfer runs `ninja` and `$CUDA_HOME/bin/nvcc` (CUDA_HOME defaults to nvcc's install on PATH)
if ! command -v ninja >/dev/null 2>&1; then
  export PATH="$(python3 -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null):$PATH"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
unset _fi_here _fi_home
SH

size=$(stat -c %s "$out/flashinfer-site.tar.xz")
echo "wrote $out/flashinfer-site.tar.xz ($(( size / 1048576 )) MiB; the carry limit is 64 MiB) and $out/setup.sh"
echo "on the GPU machine (carry $out): source $out/setup.sh && python3 benchmarks/check_flashinfer.py"
