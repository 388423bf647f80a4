#!/usr/bin/env bash
# One check of this repository on a GPU machine, in under 8 minutes (one GPU, 16 cores, no internet):
#   1. the device tests on the GPU: every test parametrised by device runs its "cuda" case (tests/test_nonfinite.py,
#      tests/test_op_counts.py: no host synchronisation under torch.cuda.set_sync_debug_mode("error"),
#      tests/test_benchmarks.py: CUDA-event timing), plus the operator-count pins of tests/test_op_counts.py;
#   2. benchmarks/op_counts.py on the GPU (top-level operators per call, both chunk policies, and the reference);
#   3. benchmarks/run.py --device cuda side by side with the reference (times from CUDA events, medians);
# then prints one markdown table (time, memory, operators per workload) and writes it, with the logs, to
# benchmarks/results/gpu_check-<date>/ (summary.md) and benchmarks/results/gpu_check.md.
#
# Usage, from anywhere (the script moves to the repository root):
#   benchmarks/gpu_check.sh                                   # ours only, on CUDA
#   REF_PYTHON=/path/to/ref-venv/bin/python benchmarks/gpu_check.sh
#   REF_WHEEL=wheels/vector_quantize_pytorch-1.32.0-py3-none-any.whl benchmarks/gpu_check.sh
#   DEVICE=cpu benchmarks/gpu_check.sh --quick                # dry run without a GPU, tiny sizes
#
# Environment:
#   DEVICE      cuda (default) or cpu (a dry run)
#   PYTHON      interpreter with torch and this repository's requirements (default: python3)
#   REF_PYTHON  interpreter that imports vector-quantize-pytorch 1.32.0 (the reference); without it, and without
#               REF_WHEEL, the reference columns show "-" and the summary says that the reference was skipped
#   REF_WHEEL   a reference wheel: installed with pip --no-index (its dependencies found next to it) into a
#               virtual environment that reuses PYTHON's torch (--system-site-packages)
#   JOBS        op_counts.py worker processes at once (default 4)
#   TEST_TIMEOUT, COUNT_TIMEOUT, RUN_TIMEOUT   seconds per stage (default 120, 120, 210)
# Options: --quick passes --quick (tiny sizes) to both benchmarks.
# Exit status: 1 if a test failed (or no device test ran), else 2 if a benchmark stage failed, else 0.

set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-4}"
QUICK=()
if [[ "${1:-}" == "--quick" ]]; then QUICK=(--quick); fi
OUT="benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S)"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

check_device() {
    if [[ "$DEVICE" == cuda* ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        log "DEVICE=$DEVICE but torch.cuda.is_available() is False (use DEVICE=cpu for a dry run)"
        exit 1
    fi
}

reference_python() {
    # Prints the reference interpreter, or nothing when there is none.
    if [[ -n "${REF_PYTHON:-}" ]]; then
        echo "$REF_PYTHON"
    elif [[ -n "${REF_WHEEL:-}" ]]; then
        local venv="$OUT/ref-venv"
        if "$PYTHON" -m venv --system-site-packages "$venv" >&2 \
            && "$venv/bin/python" -m pip install --no-index --find-links "$(dirname "$REF_WHEEL")" "$REF_WHEEL" \
                >"$OUT/ref-install.log" 2>&1; then
            echo "$venv/bin/python"
        else
            log "could not install $REF_WHEEL (see $OUT/ref-install.log): skipping the reference"
        fi
    fi
}

run_tests() {
    # The device-parametrised tests select their device by name ("cpu", "cuda": CUDA cases exist when
    # torch.cuda.is_available()); the op-count pins run on the CPU whatever the device.
    log "tests on $DEVICE"
    timeout "${TEST_TIMEOUT:-120}" "$PYTHON" -m pytest -p no:cacheprovider \
        tests/test_nonfinite.py tests/test_op_counts.py tests/test_benchmarks.py -k "$DEVICE or creep_up" \
        >"$OUT/tests.log" 2>&1
}

test_summary() {
    # pytest's last line: "N passed, M deselected in S s", or how it failed
    tail -1 "$OUT/tests.log" | tr -d '='
}

main() {
    check_device
    mkdir -p "$OUT"
    local ref ref_args=(--no-reference) ref_note="reference skipped (set REF_PYTHON or REF_WHEEL)"
    ref="$(reference_python)"
    if [[ -n "$ref" ]]; then
        ref_args=(--reference-python "$ref")
        ref_note="reference: $(cd "${TMPDIR:-/tmp}" && "$ref" -c 'import vector_quantize_pytorch as v
from importlib.metadata import version
print(version("vector-quantize-pytorch"), "from", v.__file__)' 2>&1 | tail -1)"
    fi
    log "$ref_note"

    local tests_rc counts_rc run_rc
    run_tests
    tests_rc=$?
    log "tests: $(test_summary) (exit $tests_rc)"

    log "operator counts"
    timeout "${COUNT_TIMEOUT:-120}" "$PYTHON" benchmarks/op_counts.py --device "$DEVICE" "${ref_args[@]}" \
        "${QUICK[@]}" --jobs "$JOBS" --timeout 100 --out "$OUT/op_counts.json" >"$OUT/op_counts.md" 2>"$OUT/op_counts.log"
    counts_rc=$?

    log "benchmarks (run.py)"
    timeout "${RUN_TIMEOUT:-210}" "$PYTHON" benchmarks/run.py --device "$DEVICE" "${ref_args[@]}" "${QUICK[@]}" \
        --one-process --warmup 2 --repeats 5 --timeout 100 --out "$OUT/run.json" >"$OUT/run.md" 2>"$OUT/run.log"
    run_rc=$?

    summarize "$ref_note" "$tests_rc" "$counts_rc" "$run_rc" | tee "$OUT/summary.md"
    cp "$OUT/summary.md" benchmarks/results/gpu_check.md
    log "wrote $OUT/summary.md and benchmarks/results/gpu_check.md"
    if ((tests_rc != 0)); then exit 1; fi
    if ((counts_rc != 0 || run_rc != 0)); then exit 2; fi
    exit 0
}

summarize() {
    local ref_note="$1" tests_rc="$2" counts_rc="$3" run_rc="$4"
    echo "# gpu_check: $DEVICE${QUICK:+ (quick sizes)}"
    echo
    echo "- machine: $("$PYTHON" -c 'import torch, platform
name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads")' 2>&1 | tail -1)"
    echo "- $ref_note"
    echo "- tests: $(test_summary) (exit $tests_rc)"
    echo "- op_counts.py: exit $counts_rc; run.py: exit $run_rc (logs in $OUT)"
    echo
    if [[ -s "$OUT/run.json" && -s "$OUT/op_counts.json" ]]; then
        "$PYTHON" benchmarks/op_counts.py --combine "$OUT/run.json" "$OUT/op_counts.json"
    else
        cat "$OUT/run.md" "$OUT/op_counts.md"
    fi
    echo
    echo "Times: medians of $([[ "$DEVICE" == cuda* ]] && echo "CUDA event times" || echo "wall clock") per iteration;"
    echo "ops: top-level aten:: operators per call (ours under each chunk policy; the reference has none)."
}

main "$@"
