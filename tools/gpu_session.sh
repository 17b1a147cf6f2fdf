#!/usr/bin/env bash
# The GPU session in one command, inside one deadline: check the machine, build hvae_fast with
# its CUDA kernels, smoke-check every op, run the CUDA tests and the quick benchmark, then with
# the time left the torch.compile/opcheck tests, the compiled benchmark rows and a
# compute-sanitizer pass. Everything goes into OUTDIR; a short summary is printed last.
#
#   tools/gpu_session.sh OUTDIR [--deadline SECONDS] [--commit SHA] [--rehearse]
#   tools/gpu_session.sh --help
#
#   --deadline  seconds for the whole session (default 540: the device tool allows 600 a command;
#               run it with timeout_s=600). --rehearse's default: 240.
#   --commit    the commit being tested, for the record (default: $GIT_COMMIT, else git rev-parse
#               HEAD where .git is there; a device call may not carry .git)
#   --rehearse  the same script on a CPU machine: no build (the built CPU extension must import),
#               the smoke check and the benchmark on the CPU through their stand-ins for torch.cuda's
#               calls (benchmarks/gpu_quick.py's Device), the CUDA tests selected as on a GPU (they
#               skip), the compile/opcheck phase with the CPU's cases too (so that the phase is
#               stopped by SIGINT at its cap, as on a GPU it may be), the smoke check bare in place
#               of compute-sanitizer. CI runs it.
#
# OUTDIR receives 8 files, no folders (a device call brings back 8 files at most):
#   env.txt      the command, the commit, the machine: GPU, driver, nproc, python and its headers,
#                ninja, nvcc, compute-sanitizer, torch, pip list
#   build.log    the build (setup.py build_ext --inplace, ninja), each file's compile time from
#                ninja's log, the import check
#   smoke.log    tools/gpu_smoke.py (every op and dtype against the float64 reference, CUDA_LAUNCH_
#                BLOCKING=1), then the same under compute-sanitizer memcheck
#   tests.log    both pytest runs (--durations), each stopped by SIGINT at its cap if need be
#   tests.xml    their JUnit XML, one test suite per run
#   bench.jsonl  benchmarks/gpu_quick.py's rows, each written as it finishes (eager rows, then
#                compiled rows)
#   bench.log    the benchmark's output, with the traceback of any failed row
#   summary.txt  what is printed last: each phase's status and time, the smoke check's line per op,
#                the tests' counts and failures, the benchmark table
#
# Phases, in order; each is given what is left of the deadline less a reserve for the phases after
# it (reserves in seconds at the 540-s deadline, scaled with it), and is stopped with SIGINT at its
# cap (SIGKILL 10 s later), so that pytest and the benchmark still write their summary and files:
#   env            machine check                                       -
#   build          skipped when hvae_fast already imports with CUDA     cap: left - 230
#                  kernels; else HVAE_FAST_CUDA=1 setup.py build_ext
#                  --inplace, MAX_JOBS=nproc, TORCH_CUDA_ARCH_LIST=9.0
#   smoke          tools/gpu_smoke.py, CUDA_LAUNCH_BLOCKING=1            cap: min(90, left - 170)
#   tests          pytest -m cuda -k "not compile and not opcheck",     cap: left - 110
#                  the kernels' own test files first
#   bench          gpu_quick.py --rows eager                            cap: left - 90
#   compile tests  pytest -m cuda -k "compile or opcheck"               cap: (left - 90) / 2
#   compile bench  gpu_quick.py --rows compile                          cap: left - 90
#   memcheck       compute-sanitizer --tool memcheck on the smoke       only if left - 30 >= 60;
#                  check, PYTORCH_NO_CUDA_MEMORY_CACHING=1                cap: left - 30
#   summary        the last 30 s
# Exit status: 0; 1 once a phase failed (a phase stopped at its cap is not a failure; the build
# failing ends the session there); 2 for bad arguments.
# Not yet run on a GPU: rehearsed on a 2-vCPU CPU machine only (--rehearse: 164 s of its 240 s).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

OUTDIR= REHEARSE=0 DEADLINE= COMMIT=${GIT_COMMIT:-} ARGS="$*"
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --rehearse) REHEARSE=1 ;;
    --deadline) DEADLINE=${2:-}; shift ;;
    --commit) COMMIT=${2:-}; shift ;;
    -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_session.sh: one OUTDIR only (see --help)" >&2; exit 2; }; OUTDIR=$1 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || { usage >&2; exit 2; }
[ -n "$DEADLINE" ] || DEADLINE=$([ $REHEARSE = 1 ] && echo 240 || echo 540)
case $DEADLINE in ''|*[!0-9]*) echo "gpu_session.sh: --deadline takes whole seconds" >&2; exit 2 ;; esac
START=$(date +%s)
END=$((START + DEADLINE))
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
FILES="env.txt build.log smoke.log tests.log tests.xml bench.jsonl bench.log summary.txt"
for f in $FILES; do rm -f "$OUTDIR/$f"; done
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
R=()  # --rehearse for the Python tools, or nothing
[ $REHEARSE = 1 ] && R=(--rehearse)
SUMMARY=$OUTDIR/summary.txt
GRACE=10  # SIGKILL this long after a cap's SIGINT

note() { echo "$*" | tee -a "$SUMMARY"; }
now() { date +%s; }
left() { echo $((END - $(now))); }
res() { echo $(($1 * DEADLINE / 540)); }  # a reserve given at the 540-s scale
cap() { echo $(($1 - GRACE)); }  # the SIGINT time of a phase that may take $1 s in all
# capped CAP LOG CMD...: CMD into LOG, SIGINT at CAP s (then SIGKILL); rc 124 if stopped, 200 if not run
capped() {
  local c=$1 log=$2
  shift 2
  if [ "$c" -lt 1 ]; then echo "+ not run: no time left" >>"$log"; return 200; fi
  echo "+ [$(date +%T), SIGINT after ${c} s] $*" >>"$log"
  timeout -s INT -k $GRACE "$c" "$@" >>"$log" 2>&1
}
FAILED=0  # the script's exit status: 1 once a phase failed (stopped at its cap is not a failure)
track() { case $1 in 0|124|137|200) ;; *) FAILED=1 ;; esac; }
how() {  # a phase's rc in words
  case $1 in 0) echo ok ;; 124) echo "STOPPED by SIGINT at its cap" ;;
    137) echo "STOPPED by SIGINT at its cap, then KILLED (not gone ${GRACE} s later)" ;;
    200) echo "not run: no time left" ;; *) echo "FAILED (rc $1)" ;; esac
}

# ---- env ---------------------------------------------------------------------------------------
if [ -z "$COMMIT" ]; then
  COMMIT=$(git rev-parse HEAD 2>/dev/null) && COMMIT="$COMMIT, $(git status --porcelain 2>/dev/null | wc -l) paths changed" \
    || COMMIT="unknown (no .git: pass --commit or GIT_COMMIT)"
fi
ver() { command -v "$1" >/dev/null 2>&1 && "$@" 2>&1 | grep -v '^\s*$' | tail -1 || echo "NOT FOUND"; }
PYH=$("$PY" -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print(h if os.path.exists(h) else 'NOT FOUND: ' + h)" 2>&1)
TORCH=$("$PY" -c "import torch; print(torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tail -1)
MACHINE="ninja $(ver ninja --version) | Python.h $PYH | nvcc $(ver nvcc --version) | compute-sanitizer $(ver compute-sanitizer --version) | torch $TORCH"
{
  echo "command: $0 $ARGS"
  echo "date: $(date -Is)"
  echo "commit: $COMMIT"
  echo "mode: $([ $REHEARSE = 1 ] && echo 'REHEARSAL on the CPU' || echo GPU), deadline $DEADLINE s"
  echo "host: $(uname -srm), nproc $(nproc), $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB memory"}')"
  echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
  echo "machine: $MACHINE"
  echo "CUDA_HOME: ${CUDA_HOME:-unset}"
  echo "---- nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  echo "---- pip list"
  "$PY" -m pip list --format=freeze 2>&1
} >"$OUTDIR/env.txt"
note "commit: $COMMIT"
note "session: $([ $REHEARSE = 1 ] && echo 'REHEARSAL on the CPU' || echo GPU), deadline $DEADLINE s, $(date -Is)"
note "machine: $MACHINE"

# ---- build -------------------------------------------------------------------------------------
t=$(now)
CHECK="import sys, torch, hvae_fast
i = hvae_fast.build_info()
ok = i['loaded'] and (sys.argv[1] == '1' or bool(i.get('cuda_kernels') and torch.cuda.is_available()))
print('ok' if ok else 'NOT READY', '| loaded', i['loaded'], '| cuda_kernels', i.get('cuda_kernels'), '| arch',
      i.get('cuda_arch'), '| built for torch', i.get('torch_version'), '| gpu', torch.cuda.is_available(),
      '|', i.get('why_not_loaded') or '')
sys.exit(0 if ok else 1)"
if [ $REHEARSE = 1 ]; then
  build="skipped (--rehearse: the CPU extension already built here)"
elif "$PY" -c "$CHECK" 0 >/dev/null 2>&1; then
  build="skipped: hvae_fast already imports with its CUDA kernels"
else
  export HVAE_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  [ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  capped "$(cap $(($(left) - $(res 230))))" "$OUTDIR/build.log" "$PY" setup.py build_ext --inplace
  rc=$?
  track $rc
  build="$(how $rc), MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST"
  "$PY" tools/session_tools.py ninja-times build >>"$OUTDIR/build.log" 2>&1
fi
ready=$("$PY" -c "$CHECK" $REHEARSE 2>&1 | tail -1)
echo "import check: $ready" >>"$OUTDIR/build.log"
note "build: $build, $(($(now) - t)) s; import check: $ready"
case $ready in ok*) ;; *)
  note "last lines of build.log:"; tail -25 "$OUTDIR/build.log" | tee -a "$SUMMARY"
  note "nothing else runs without the kernels; total $(($(now) - START)) s"
  exit 1 ;;
esac

# ---- smoke check -------------------------------------------------------------------------------
t=$(now)
c=$(($(left) - $(res 170)))
[ "$c" -gt "$(res 90)" ] && c=$(res 90)
CUDA_LAUNCH_BLOCKING=1 capped "$(cap "$c")" "$OUTDIR/smoke.log" "$PY" tools/gpu_smoke.py "${R[@]}"
rc=$?
track $rc
note "smoke: $(how $rc), $(($(now) - t)) s"
grep -E "^smoke: " "$OUTDIR/smoke.log" | tee -a "$SUMMARY"

# ---- tests -------------------------------------------------------------------------------------
# The kernels' own test files first, then the others; -m cuda: tests/test_cuda.py and the "cuda"
# case of every device-parametrized test.
FIRST="test_cuda.py test_ops.py test_dmol.py test_noise.py test_overwrite_logits.py test_pixel_categorical.py
  test_linear_categorical.py test_optim.py test_autocast.py"
TESTS=()
for f in $FIRST; do [ -f "tests/$f" ] && TESTS+=("tests/$f"); done
for f in tests/test_*.py; do case " ${TESTS[*]} " in *" $f "*) ;; *) TESTS+=("$f") ;; esac; done
tests() {  # tests LABEL MARK KEYWORDS JUNIT CAP
  local t0 rc
  t0=$(now)
  echo "==== $1: -m '$2' -k '$3'" >>"$OUTDIR/tests.log"
  capped "$(cap "$5")" "$OUTDIR/tests.log" "$PY" tools/session_tools.py pytest -q -p no:cacheprovider -m "$2" \
    -k "$3" --durations=15 --junitxml "$4" "${TESTS[@]}"
  rc=$?
  track $rc
  note "$1: $(how $rc), $(($(now) - t0)) s"
  [ -f "$4" ] && "$PY" tools/session_tools.py junit-counts "$4" | sed 's/^/  /' | tee -a "$SUMMARY"
  [ -f "$4" ] || note "  no JUnit file"
  grep -E "^hvae_fast kernels:" "$OUTDIR/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
}
tests "tests" cuda "not compile and not opcheck" "$OUTDIR/tests.xml" $(($(left) - $(res 110)))

# ---- bench -------------------------------------------------------------------------------------
bench() {  # bench LABEL ROWS CAP
  local t0 c rc
  t0=$(now)
  c=$(cap "$3")
  echo "==== $1" >>"$OUTDIR/bench.log"
  capped "$c" "$OUTDIR/bench.log" "$PY" benchmarks/gpu_quick.py --rows "$2" --budget $((c - $(res 15))) \
    --out "$OUTDIR/bench.jsonl" "${R[@]}"
  rc=$?
  track $rc
  note "$1: $(how $rc), $(($(now) - t0)) s; $(grep -E '^gpu_quick: ' "$OUTDIR/bench.log" | tail -1)"
}
bench "bench (eager rows)" eager $(($(left) - $(res 90)))

# ---- with the time left: compile and opcheck tests, compiled rows, compute-sanitizer -------------
MARK2=cuda
[ $REHEARSE = 1 ] && MARK2="cuda or not cuda"  # the CPU's compile cases too: slow enough to meet the cap
tests "compile tests" "$MARK2" "compile or opcheck" "$TMPD/tests2.xml" $((($(left) - $(res 90)) / 2))
[ -f "$TMPD/tests2.xml" ] && "$PY" tools/session_tools.py junit-merge "$OUTDIR/tests.xml" "$TMPD/tests2.xml"
bench "bench (compiled rows)" compile $(($(left) - $(res 90)))

t=$(now)
if [ $(($(left) - $(res 30))) -ge $(res 60) ]; then
  SAN=(compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 --print-limit 50)
  [ $REHEARSE = 1 ] && SAN=()  # no GPU: the smoke check runs bare
  echo "==== memcheck: ${SAN[*]:-(--rehearse: no sanitizer)} with PYTORCH_NO_CUDA_MEMORY_CACHING=1" >>"$OUTDIR/smoke.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped "$(cap $(($(left) - $(res 30))))" "$OUTDIR/smoke.log" \
    "${SAN[@]}" "$PY" tools/gpu_smoke.py "${R[@]}"
  rc=$?
  track $rc
  note "memcheck: $(how $rc)$([ $rc = 9 ] && echo ': the sanitizer found errors'), $(($(now) - t)) s;" \
    "$(grep -E 'ERROR SUMMARY|^smoke: (all ok|[0-9]+ FAILED)' "$OUTDIR/smoke.log" | tail -1)"
else
  note "memcheck: not run: $(left) s left, under $(($(res 60) + $(res 30))) s"
fi

# ---- summary -----------------------------------------------------------------------------------
if [ -f "$OUTDIR/bench.jsonl" ]; then
  "$PY" benchmarks/gpu_quick.py --table "$OUTDIR/bench.jsonl" 2>&1 | grep -vE '^# |^$' | cut -c1-200 >>"$SUMMARY"
fi
n=$(find "$OUTDIR" -type f | wc -l)
note "files: $n in $OUTDIR$([ "$n" -gt 8 ] && echo ' (MORE THAN 8: a device call brings back 8)')"
note "total: $(($(now) - START)) s of the $DEADLINE s deadline; $([ $FAILED = 0 ] && echo 'no phase failed' || echo 'a phase FAILED')"
echo
echo "==== summary ($SUMMARY) ===="
cat "$SUMMARY"
exit $FAILED
