#!/usr/bin/env bash
# Builds hvae_fast with its CUDA kernels in a throw-away directory and checks that
# the CUDA kernels are registered. Needs nvcc and a CUDA build of torch; runs
# without a GPU (nothing is launched). Usage:
#   tools/check_cuda_build.sh [PYTHON]     PYTHON: one whose torch is a CUDA build
set -euo pipefail
PY=${1:-python}
case $PY in */*) PY=$(realpath -s "$PY") ;; esac  # it runs from other directories below
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export HVAE_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
cd "$ROOT"
start=$(date +%s)
"$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
echo "CUDA build: $(( $(date +%s) - start )) s wall with MAX_JOBS=$MAX_JOBS; compile time per file (ninja's log):"
"$PY" "$ROOT/tools/session_tools.py" ninja-times "$OUT/tmp"
cd "$OUT"  # not the source tree: load only the freshly built module
"$PY" - "$OUT/lib/hvae_fast" "$ROOT" <<'PY'
import json, pathlib, re, sys, torch
lib = pathlib.Path(sys.argv[1])
torch.ops.load_library(str(next(lib.glob("_C*.so"))))
info = json.loads((lib / "_build_info.json").read_text())
# every operator csrc/hvae_fast.cpp defines
ops = re.findall(r'm\.def\("(\w+)\(', pathlib.Path(sys.argv[2], "csrc", "hvae_fast.cpp").read_text())
missing = [f"{o}/{key}" for o in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hvae_fast::{o}", key)]
print("build info:", info)
if missing or not info["cuda_kernels"]:
    sys.exit(f"CUDA build check failed: missing kernels {missing}")
print(f"CUDA build check passed: {len(ops)} ops with CPU and CUDA kernels")
PY
