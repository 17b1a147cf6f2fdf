#!/usr/bin/env bash
# Builds hvae_fast with its CUDA kernels and runs benchmarks/run.py on the GPU in float32 and
# bfloat16, into benchmarks/results/gpu-<card>.json (both dtypes) and gpu-<card>.md.
#   usage: benchmarks/gpu.sh [extra run.py options, e.g. --quick]      PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

HVAE_FAST_CUDA=1 "$PY" -m pip install --no-build-isolation -e .
"$PY" - <<'PYEOF'
import sys, torch, hvae_fast
info = hvae_fast.build_info()
print(info)
if not (torch.cuda.is_available() and info["loaded"] and info["cuda_kernels"]):
    sys.exit("gpu.sh: no GPU, or hvae_fast was built without its CUDA kernels")
PYEOF
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
out=benchmarks/results/gpu-$card
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for dtype in float32 bfloat16; do
  "$PY" benchmarks/run.py --device cuda --dtype "$dtype" --alloc default \
    --out "$tmp/$dtype.json" --md "$tmp/$dtype.md" "$@"
done
"$PY" - "$tmp" "$out" <<'PYEOF'
import json, sys
tmp, out = sys.argv[1:]
res = {d: json.load(open(f"{tmp}/{d}.json")) for d in ("float32", "bfloat16")}
json.dump(res, open(f"{out}.json", "w"), indent=1)
with open(f"{out}.md", "w") as f:
    m = res["float32"]["meta"]
    f.write(f"# hvae_fast benchmarks on {m['gpu']}\n\ntorch {m['torch']}, {m['date']}, `benchmarks/gpu.sh`\n\n")
    for d in res:
        f.write(f"## {d}\n\n" + open(f"{tmp}/{d}.md").read() + "\n")
print("wrote", f"{out}.json", f"{out}.md")
PYEOF
