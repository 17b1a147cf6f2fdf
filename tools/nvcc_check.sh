#!/usr/bin/env bash
# Compiles each CUDA source (csrc/cuda/**/*.cu) alone with nvcc against a CUDA torch's
# headers, with the flags setup.py gives, and prints ptxas's resource report per kernel
# (registers, stack frame, spills). Fails on a compile error, and on any spill store or
# load unless HVAE_FAST_ALLOW_SPILLS=1. No GPU needed, nothing linked or launched; much
# faster than tools/check_cuda_build.sh (which also builds the CPU kernels and loads the
# module). Usage:
#   tools/nvcc_check.sh [PYTHON] [STD] [FILE.cu ...]
#     PYTHON  one whose torch is a CUDA build (default: python)
#     STD     17 or 20 (default: what setup.py picks for that torch: 20 from torch 2.14)
#   TORCH_CUDA_ARCH_LIST (default 9.0), NVCC (default $CUDA_HOME/bin/nvcc or nvcc),
#   MAX_JOBS (parallel nvcc processes, default 1)
#   TORCH_INCLUDE=DIR  compile against another torch's headers: DIR is the torch/include of an
#                      unpacked wheel (torch/version.py beside it gives the version and so the
#                      default STD), e.g. torch 2.11's, the C++17 configuration of torch < 2.14;
#                      PYTHON then only supplies the CUDA library headers (nvidia/*/include)
#   NVCC_FAST=1        front end only in effect (-Xcicc -O0 -Xptxas -O0): checks the C++, skips
#                      the resource report's meaning (no spill check)
set -euo pipefail
PY=${1:-python}
STD=${2:-}
shift $(( $# > 2 ? 2 : $# ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
[ -x "$NVCC" ] || NVCC=$(command -v nvcc) || { echo "nvcc_check: nvcc not found"; exit 1; }
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# include paths, defines and the standard, from the torch at hand
eval "$(CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")} "$PY" - "$STD" 2>/dev/null <<'PY'
import glob, os, re, shlex, sys, sysconfig, torch
import torch.utils.cpp_extension as ce
top = os.environ.get("TORCH_INCLUDE") or os.path.join(os.path.dirname(torch.__file__), "include")
version = torch.__version__
if os.environ.get("TORCH_INCLUDE"):
    vfile = os.path.join(os.path.dirname(os.path.abspath(top)), "version.py")
    m = re.search(r"__version__ = '([^']+)'", open(vfile).read()) if os.path.exists(vfile) else None
    version = m.group(1) if m else "unknown (headers in %s)" % top
mm = tuple(int(v) for v in re.findall(r"\d+", version)[:2]) or (0, 0)
std = sys.argv[1] or ("20" if mm >= (2, 14) else "17")
inc = [top, os.path.join(top, "torch", "csrc", "api", "include"), sysconfig.get_paths()["include"]]
for site in sys.path:
    inc += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
flags = [f"-I{p}" for p in inc] + list(ce.COMMON_NVCC_FLAGS) + [
    f"-std=c++{std}", "--extended-lambda", "-O3", "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    "--compiler-options", "-fPIC"]
if os.environ.get("NVCC_FAST") == "1":
    flags += ["-Xcicc", "-O0", "-Xptxas", "-O0"]
print(f"STD={std}; TORCH={shlex.quote(version)}; FLAGS=({' '.join(shlex.quote(f) for f in flags)})")
PY
)"
gencode=()
for a in ${ARCH//;/ }; do
  a=${a%+PTX}; n=${a/./}
  gencode+=(-gencode "arch=compute_$n,code=sm_$n")
done
files=("$@")
[ ${#files[@]} -gt 0 ] || files=("$ROOT"/csrc/cuda/*.cu "$ROOT"/csrc/cuda/*/*.cu)
echo "nvcc_check: $("$NVCC" --version | tail -1), torch $TORCH, -std=c++$STD, arch $ARCH, ${#files[@]} files"
name() {  # a source's path under csrc/cuda, one word: categorical_log_likelihood/float.cu -> ..._float.cu
  local r=${1#"$ROOT"/csrc/cuda/}
  echo "${r//\//_}"
}
compile() {  # one file; its log and time in $OUT
  local f=$1 log=$OUT/$(name "$1").log t0=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${gencode[@]}" -I"$ROOT/csrc" -Xptxas -v -c "$f" -o "$OUT/$(name "$f").o" >"$log" 2>&1; then
    echo ok >"$log.rc"
  else
    echo fail >"$log.rc"
  fi
  echo $(( SECONDS - t0 )) >"$log.s"
}
jobs_max=${MAX_JOBS:-1}
for f in "${files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  compile "$f" &
done
wait
status=0
for f in "${files[@]}"; do
  b=${f#"$ROOT"/csrc/cuda/}; log=$OUT/$(name "$f").log
  if [ "$(cat "$log.rc")" != ok ]; then
    echo "FAILED $b ($(cat "$log.s") s):"; grep -v "^ptxas info" "$log" | head -60; status=1; continue
  fi
  kernels=$(grep -c "Compiling entry function" "$log" || true)
  spills=$(grep -cE "(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
  maxreg=$( (grep -oE "Used [0-9]+ registers" "$log" || true) | awk '{print $2}' | sort -n | tail -1)  # none: host code only
  stack=$( (grep -oE "[0-9]+ bytes stack frame" "$log" || true) | awk '{print $1}' | sort -n | tail -1)
  echo "ok $b ($(cat "$log.s") s): $kernels kernels, at most ${maxreg:-0} registers, stack frame up to ${stack:-0} bytes, $spills with spills"
  if [ "$spills" != 0 ] && [ "${NVCC_FAST:-0}" != 1 ]; then
    grep -E -B1 "(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)" "$log" | awk 'NR <= 20' || true
    echo "  (kernels with spills by scalar type: $(grep -E -B1 "(^|[^0-9])[1-9][0-9]* bytes spill" "$log" |
      grep -oE "E(d|f|N3c104HalfE|N3c108BFloat16E)[a-z]?EEv" | sort | uniq -c | tr '\n' ' '))"
    [ "${HVAE_FAST_ALLOW_SPILLS:-0}" = 1 ] || status=1
  fi
done
[ $status = 0 ] && echo "nvcc_check passed (-std=c++$STD)" || echo "nvcc_check FAILED (-std=c++$STD)"
exit $status
