#!/usr/bin/env bash
# The one prepared GPU check, for a machine lent for minutes: torch with CUDA preinstalled
# (Python 3.12, torch 2.11+cu130, nvcc 13.0, NVIDIA's cuBLAS/cuSOLVER wheels), no internet.
# Builds the package from this working tree (offline: no build isolation, no dependencies),
# runs the CUDA kernel tests, the CUDA optimizer tests, the pointer-table I/O tests
# (test_cuda_param_io, test_cuda_direct_io) and benchmarks/bench_cuda.py (then an
# optional part: benchmarks/lm_convergence.py --quick --device cuda), each
# under its own timeout, and writes ONE report file: device, versions, commands, pass/fail
# counts, the benchmark tables, and the tail of any failure. Whole run: under 8 minutes on an
# H100/H200: the part timeouts add up to 8 minutes, and a whole-run deadline (TOTAL) cuts
# any part short so that the run ends in time even when early parts use their full limit.
#
# Usage: tools/gpu_check.sh [REPORT]   (default: $OUT/gpu_check_report.txt, else ./gpu_check_report.txt)
# Exit: 0 all parts passed; 1 a part failed (see the report); 3 no GPU here (nothing run).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
REPORT=${1:-${OUT:-.}/gpu_check_report.txt}
BUILD_TIMEOUT=${GPU_CHECK_BUILD_TIMEOUT:-120}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-110}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-80}
TOTAL=${GPU_CHECK_TOTAL:-450}

# Refuse cleanly before building anything when there is no GPU to check.
if ! "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except Exception as exc:  # no torch at all
    print(f"gpu_check: cannot import torch ({exc}); this check needs torch with CUDA", file=sys.stderr)
    sys.exit(3)
if torch.version.cuda is None or not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print(f"gpu_check: no CUDA GPU visible to torch (torch {torch.__version__}, CUDA build "
          f"{torch.version.cuda}); refusing to run: this check is for a machine with a GPU",
          file=sys.stderr)
    sys.exit(3)
EOF
then
    exit 3
fi

mkdir -p "$(dirname "$REPORT")"
: >"$REPORT"
say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
FAILED=0
LOGDIR=$(mktemp -d)

# part NAME TIMEOUT CMD...: runs one part, records its command, exit status and duration;
# pytest summaries and benchmark output go into the report.
part() {
    local name=$1 limit=$2
    shift 2
    # never past the whole-run deadline (TOTAL seconds from the start, minus 10 s to report)
    local left=$((TOTAL - SECONDS - 10))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 0 ]; then
        say ""
        say "=== $name: SKIPPED (whole-run deadline of ${TOTAL}s reached)"
        FAILED=1
        return 124
    fi
    say ""
    say "=== $name (timeout ${limit}s)"
    say "\$ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
    local rc=$?
    say "exit $rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    if [ $rc -ne 0 ]; then
        FAILED=1
    fi
    return $rc
}

say "distributed-shampoo GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
"$PYTHON" - <<'EOF' | tee -a "$REPORT"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
EOF
say "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not on PATH')"

# Build from the working tree, offline: the machine has torch and no internet. Only for this
# GPU's architecture (unless SHAMPOO_CUDA_ARCHS is set): a third of the nvcc time.
ARCH=${SHAMPOO_CUDA_ARCHS:-$("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')")}
if part build "$BUILD_TIMEOUT" env SHAMPOO_BUILD_CUDA=1 SHAMPOO_CUDA_ARCHS="$ARCH" "$PYTHON" -m pip install \
        --no-build-isolation --no-deps --no-index -e .; then
    "$PYTHON" -c "from distributed_shampoo import _C_cuda, _backend; _backend._ensure_cuda_libraries(); print('built archs', _C_cuda.build_info()['archs'], '| libraries', _C_cuda.library_info())" 2>&1 | tee -a "$REPORT"
else
    tail -40 "$LOGDIR/build.log" | tee -a "$REPORT"
    say "build failed: nothing else run"
    say "RESULT: FAIL"
    exit 1
fi

# the pointer-table I/O kernels and the direct path (about 15 s on the emulator) share a part
for t in test_cuda_kernels test_cuda_optimizer test_cuda_param_io+test_cuda_direct_io; do
    files=()
    for f in ${t//+/ }; do files+=("tests/$f.py"); done
    limit=$TEST_TIMEOUT
    [[ $t == *+* ]] && limit=${GPU_CHECK_IO_TIMEOUT:-60}
    part "$t" "$limit" "$PYTHON" -m pytest -q --maxfail=25 -p no:cacheprovider "${files[@]}"
    rc=$?
    grep -E "passed|failed|error|skipped" "$LOGDIR/$t.log" | tail -1 | sed 's/^/summary: /' | tee -a "$REPORT"
    if [ $rc -ne 0 ]; then
        tail -60 "$LOGDIR/$t.log" | tee -a "$REPORT"
    fi
done

# Sized to fit its timeout on an H100/H200: few repeats, no --large models.
part bench_cuda "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_cuda.py --repeats 5 --warmup 2 \
    --root-repeats 2 --root-counts 1 16 256
cat "$LOGDIR/bench_cuda.log" >>"$REPORT"

# ---- Optional part (GPU_CHECK_LM=0 skips it): the language-model benchmark's quick setting on
# the GPU (benchmarks/lm_convergence.py --quick --device cuda); table and plot beside the report.
# Its outcome is reported but does not change RESULT: it checks training quality, not kernels.
if [ "${GPU_CHECK_LM:-1}" != 0 ]; then
    KEPT=$FAILED
    part lm_convergence "${GPU_CHECK_LM_TIMEOUT:-90}" "$PYTHON" benchmarks/lm_convergence.py --quick \
        --device cuda --no-progress --out-dir "$(dirname "$REPORT")/lm_convergence_cuda"
    cat "$LOGDIR/lm_convergence.log" >>"$REPORT" 2>/dev/null
    FAILED=$KEPT
fi

say ""
say "RESULT: $([ $FAILED -eq 0 ] && echo PASS || echo FAIL)"
say "report: $REPORT"
rm -rf "$LOGDIR"
exit $FAILED
