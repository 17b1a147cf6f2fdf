#!/usr/bin/env bash
# The install from a source distribution, as PyPI would serve it: builds the sdist, then a
# wheel from that sdist alone (python -m build), installs the wheel into a fresh virtual
# environment and, from a folder outside the checkout, checks that the compiled kernels
# loaded and that one op runs forward and backward and agrees with the reference.
#   tools/check_dist.sh [PYTHON]    PYTHON: one with torch, setuptools, wheel, ninja and build
# Prints the sizes of the wheel and of its compiled module; CI runs it.
set -euo pipefail
PY=${1:-python}
case $PY in */*) PY=$(realpath -s "$PY") ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')

cd "$ROOT"
# without --sdist or --wheel, build makes the sdist and then the wheel from it alone
"$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
sdist=$(ls "$WORK"/dist/*.tar.gz) wheel=$(ls "$WORK"/dist/*.whl)
echo "sdist: $(basename "$sdist"), $(tar tzf "$sdist" | grep -c '^[^/]*/csrc/.*[^/]$') files under csrc/"
"$PY" - "$wheel" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
so = [i for i in z.infolist() if i.filename.endswith(".so")]
print(f"wheel: {sys.argv[1].rsplit('/', 1)[-1]}: {sum(i.compress_size for i in z.infolist()) / 2**20:.1f} MiB, "
      f"{sum(i.file_size for i in z.infolist()) / 2**20:.1f} MiB unpacked "
      f"({', '.join(f'{i.filename} {i.file_size / 2**20:.1f} MiB' for i in so)})")
PY

"$PY" -m venv "$WORK/venv"  # the wheel's Python
"$WORK/venv/bin/pip" install -q "torch==$TORCH" "$wheel"
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
"$WORK/venv/bin/python" - <<'PY'
import sys, torch, hvae_fast
from hvae_fast import ops, reference
info = hvae_fast.build_info()
assert "/site-packages/" in hvae_fast.__file__, f"imported {hvae_fast.__file__}, not the installed wheel"
if not info["loaded"]:
    sys.exit(f"the wheel's compiled kernels did not load: {info['why_not_loaded']}")
torch.manual_seed(0)
logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
x = torch.randint(0, 7, (3, 5))
ll = ops.categorical_log_likelihood(logits, x)
ll.sum().backward()
leaf = logits.detach().requires_grad_()
ref = reference.categorical_log_likelihood(leaf, x)
ref.sum().backward()
torch.testing.assert_close(ll, ref)
torch.testing.assert_close(logits.grad, leaf.grad)
print(f"installed wheel OK outside the checkout: {hvae_fast.__file__}, kernels loaded "
      f"(levels {info['cpu_levels']}, active {info['cpu_level']}, debug {info['debug']}); "
      "categorical_log_likelihood forward and backward = the reference")
for name in hvae_fast.pretrained_names():  # package data: they must survive the sdist and the wheel
    model = hvae_fast.pretrained(name)
    assert "/site-packages/" in str(hvae_fast._pretrained.pretrained_path(name))
    x = model.sample(2)
    print(f"pretrained {name}: {type(model).__name__}, {hvae_fast.pretrained_card(name)['test']['bpd_elbo']:.3f} "
          f"bits/dim (ELBO) on its card, samples {tuple(x.shape)}")
if not hvae_fast.pretrained_names():
    sys.exit("the wheel ships no pretrained model (hvae_fast/checkpoints/)")
PY
