#!/usr/bin/env bash
# Builds hvae_fast's C++ kernels with AddressSanitizer and UndefinedBehaviorSanitizer in
# a throw-away copy of the tree and runs the op tests (and the fuzz tests) against it.
# Any sanitizer report fails the run. Usage (in an environment where the README's
# install worked):  tools/sanitize.sh [extra pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK")
cd "$WORK"
HVAE_FAST_SANITIZE=1 HVAE_FAST_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --inplace
# Python and libtorch are not instrumented: preload the runtimes, ignore their leaks.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
PYTHONPATH="$WORK" python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_fuzz.py tests/test_noise.py tests/test_optim.py tests/test_cpu_levels.py \
  tests/test_linear_categorical.py "$@"
python - <<'PY'
import hvae_fast
assert hvae_fast.build_info().get("sanitize"), "the sanitized build was not the one tested"
print("sanitizer run: no reports")
PY
