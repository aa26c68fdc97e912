#!/usr/bin/env bash
# One command for a session with a CUDA device (fits one 10-minute call):
#
#     bash benchmarks/gpu_run.sh [--pack]   # writes everything under $OUT (default /tmp/minivit-gpu)
#
# 0. installs the wheels that lie in .whl/ (benchmarks/fetch_wheels.sh fetches them, where PyPI
#    is reachable; the device call carries the folder) into a folder of their own, ahead of the
#    image's packages,
# 1. installs minivit from this checkout without touching the network (--no-deps),
# 2. runs the test suite on the cupy backend (fused kernels, gradient checks on the device),
# 3. runs the benchmarks: every op and model on cupy beside torch on the same GPU (fp32, TF32
#    off), then the quick op set on numpy on the host CPU (for the GPU-over-CPU speed-ups),
# 4. profiles a ViT-Ti/16 and a ViT-B/16 train step op by op beside torch's operators
#    ($OUT/profile-gpu/profile.md),
# 5. merges both benchmark runs into one report: $OUT/bench/results.{json,md} (+ PNGs where
#    matplotlib exists),
# 6. archives all of $OUT in $OUT/minivit-gpu.tar.gz. With --pack, only that archive and a few
#    files to read at once (env.txt, pytest_cupy.txt, results.md, profile.md) are left under
#    $OUT: the device tool brings back at most 8 files.
#
# Every step has its own time limit, and the script goes on after a failure, so whatever
# finished is under $OUT. The limits are also cut to a deadline of 560 s after the start (each
# step is given at most what is left of it, less 20 s), so the whole script ends within one
# 600-second device call. A limit stops its step with SIGINT (timeout -s INT), as Ctrl-C would:
# pytest then prints its summary of the tests that ran, and the benchmark writes its whole
# report of the cases that finished (marked "interrupted"). Tests run in order of importance
# (the device kernels, the ops, the models, then the rest), so a cut-off run has checked the
# core first. Unpack the archive's bench/ into benchmarks/results/<gpu-name>/ afterwards, and
# redraw the plots on a machine with matplotlib: python -m benchmarks.report DIR/results.json
#
# The interpreter is $PYTHON, else python3: on the device image python3 is the one that holds
# torch and CuPy, and a plain "python" may be another one or none.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minivit-gpu}"
mkdir -p "$OUT"
PACK=0
case "${1:-}" in
  --pack) PACK=1  # it deletes what it did not archive: only into a folder of its own
          if [[ -n "$(ls -A "$OUT")" ]]; then
            echo "--pack needs an empty \$OUT ($OUT is not)" >&2; exit 2
          fi ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--pack]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
export MPLBACKEND=Agg HYPOTHESIS_PROFILE=ci PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The device has no network. A test whose outside package is missing there (POT, unless .whl/
# brings it) is skipped, naming it, rather than failing (tests/_requires.py). Everywhere else a
# missing one fails.
export MINIVIT_MISSING_PACKAGES=skip
unset CUPY_TF32  # harness.configure sets it (off unless --tf32)
T0=$(date +%s)
DEADLINE=$((T0 + 560))
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
# limit N: N seconds, or what is left before the deadline less 20 s (a stopped step's grace)
# if that is shorter (at least 1)
limit() { local left=$((DEADLINE - $(date +%s) - 20)); ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"; }
# run NAME SECONDS CMD...: CMD under its limit, stopped by SIGINT, then killed 15 s later if it
# has not finished writing its report (the JSON and markdown come first, the plots last)
run() {
  local name=$1 secs; secs=$(limit "$2"); shift 2
  timeout -s INT -k 15 "$secs" "$@"
  local rc=$?
  echo "$name exit status $rc (limit ${secs}s; 124: stopped at the limit, 137: killed after it)"
}

shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then
  step "pip install the ${#WHEELS[@]} carried wheels in .whl/ into /tmp/minivit-site"
  if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/minivit-site "${WHEELS[@]}" > "$OUT/wheels.txt" 2>&1; then
    export PYTHONPATH="/tmp/minivit-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "installing the wheels failed (see wheels.txt); going on with the image's packages"
  fi
fi

step "environment"
{
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  timeout 60 "$PY" - <<'PY'
import platform, sys, numpy
print("python", platform.python_version(), sys.executable, "numpy", numpy.__version__)
for mod in ("cupy", "torch", "scipy", "matplotlib", "threadpoolctl", "hypothesis", "pytest",
            "transformers", "ot", "timm", "safetensors", "sklearn", "tqdm", "PIL"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", exc)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "pip install -e . (no deps, no build isolation)"
timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.txt" 2>&1 \
  || { echo "pip install failed (see pip.txt); using the checkout on PYTHONPATH"; \
       export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }

step "pytest --backend cupy (limit 240 s)"
# The files most worth a device minute first: pytest keeps the order of its file arguments
# (a bash array keeps this order; the glob expands in place). test_kernels_emulated.py runs the
# same kernels on the CPU for machines without a GPU: ~1 min that the device's own kernel
# test, test_kernels_cupy.py, makes redundant here.
FIRST=(tests/test_kernels_cupy.py tests/test_ops_*.py tests/test_blocks.py tests/test_vit.py
       tests/test_vilt.py tests/test_hybrid.py tests/test_sinkhorn.py)
mapfile -t REST < <(ls tests/test_*.py \
  | grep -v -x -F -f <(printf '%s\n' tests/test_kernels_emulated.py "${FIRST[@]}"))
run pytest 240 "$PY" -m pytest --backend cupy -q -p no:cacheprovider \
  --continue-on-collection-errors --maxfail=25 --durations=20 -rfEs "${FIRST[@]}" "${REST[@]}" \
  > "$OUT/pytest_cupy.txt" 2>&1
tail -n 6 "$OUT/pytest_cupy.txt"

step "benchmarks on cupy + torch cuda (limit 180 s)"
run "gpu benchmark" 180 "$PY" benchmarks/run.py --backend cupy --out "$OUT/bench-gpu" \
  > "$OUT/bench_gpu.txt" 2>&1
tail -n 1 "$OUT/bench_gpu.txt"

step "where a train step's time goes, op by op: ViT-Ti/16 and ViT-B/16, batch 64 (limit 45 s)"
run "gpu profile" 45 "$PY" benchmarks/profile_step.py --backend cupy \
  --models vit_tiny_patch16_224 vit_base_patch16_224 --out "$OUT/profile-gpu" \
  > "$OUT/profile_gpu.txt" 2>&1
tail -n 1 "$OUT/profile_gpu.txt"

step "quick op benchmarks on numpy + torch cpu, host CPU (limit 50 s)"
run "cpu benchmark" 50 "$PY" benchmarks/run.py --backend numpy --quick --models \
  --out "$OUT/bench-cpu" > "$OUT/bench_cpu.txt" 2>&1
tail -n 1 "$OUT/bench_cpu.txt"

step "merged report"
timeout 30 "$PY" -m benchmarks.report "$OUT/bench-gpu/results.json" "$OUT/bench-cpu/results.json" \
  --out "$OUT/bench" > "$OUT/report.txt" 2>&1 || cat "$OUT/report.txt"
grep -E "ViT|ViLT|sinkhorn" "$OUT/bench_gpu.txt" | tail -n 20
step "archive: $OUT/minivit-gpu.tar.gz"
# Everything, for benchmarks/results/; with --pack, only the archive and the files worth reading
# at once stay beside it (the device tool brings back at most 8 files, two folders down).
(
  cd "$OUT" || exit 1
  # (no archive, no cleanup: the loose files are all there is)
  { tar czf /tmp/minivit-gpu.tar.gz --exclude=./minivit-gpu.tar.gz . \
      && mv /tmp/minivit-gpu.tar.gz .; } || { echo "archiving failed: files left as written"; exit 1; }
  ((PACK)) || exit 0
  [[ -f bench/results.md ]] && cp bench/results.md results.md
  [[ -f profile-gpu/profile.md ]] && cp profile-gpu/profile.md profile.md
  for f in * .[!.]*; do
    [[ -e $f ]] || continue
    case "$f" in
      minivit-gpu.tar.gz | env.txt | pytest_cupy.txt | results.md | profile.md) ;;
      *) rm -rf -- "$f" ;;
    esac
  done
  ls -l
)
step "done"
