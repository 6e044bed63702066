#!/usr/bin/env bash
# The GPU day in one call: on a GPU machine with torch installed and no network, prove every kernel
# and measure the targets, within a device session's limits (one call <= 10 min, <= 8 files back).
#
#   scripts/gpu_check.sh [--dry-run] all            build tests sanitize bench pack (about 9 min)
#   scripts/gpu_check.sh [--dry-run] STAGE...       some of them, in this order; `pack` always ends
#
# Stages, each in its own time box (seconds; PEFTKERN_BOX_<STAGE> overrides). A stage that runs out
# of time is reported as such and the next one starts.
#   build     setuptools build for the visible GPU's arch only (MAX_JOBS = cores), and the CMake build
#             of the C++ launcher tests beside it
#   tests     the CUDA tests only (pytest -m cuda), across processes (pytest-xdist), each test held to
#             --case-timeout; then the launcher tests (CTest)
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck, synccheck over tests/test_sanitize.py
#             (every kernel once, odd sizes, each dtype), the four tools side by side, each time-boxed,
#             checking peftkern's kernels only
#   bench     bench.run --quick, the issues' target shapes first, stopping new cases at its budget
#   pack      $OUT/gpu_check.md (device, per-family test counts, sanitizer errors per tool, the
#             benchmark against its targets, stage times), $OUT/pytest.xml, $OUT/bench.md and
#             $OUT/logs.tar.gz (every log and result file): 4 files
# --dry-run runs the same stages without a GPU: nothing is built for the GPU (the installed build is
# imported), the CUDA tests are collected and run (they skip), the sanitizer commands are printed,
# not run, the bench lists its cases in order; the boxes, the packing and the budget are real. CI
# runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 0 ] && set -- all
[ "$1" = "all" ] && set -- build tests sanitize bench
stages=()
for s in "$@"; do
  case "$s" in
    build | tests | sanitize | bench) stages+=("$s") ;;
    pack) ;;
    *) echo "gpu_check: unknown stage '$s' (build tests sanitize bench pack, or all)"; exit 2 ;;
  esac
done
stages+=(pack)

OUT=${OUT:-$ROOT/gpu_check_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
box_build=${PEFTKERN_BOX_BUILD:-150}
box_tests=${PEFTKERN_BOX_TESTS:-150}
box_sanitize=${PEFTKERN_BOX_SANITIZE:-110}
box_bench=${PEFTKERN_BOX_BENCH:-100}
box_pack=${PEFTKERN_BOX_PACK:-15}
CASE_TIMEOUT=${PEFTKERN_CASE_TIMEOUT:-60}

budget=0
for s in "${stages[@]}"; do v=box_$s; budget=$((budget + ${!v})); done
echo "gpu_check$([ $DRY = 1 ] && echo ' (dry run)'): stages ${stages[*]}; boxes:$(for s in "${stages[@]}"; do v=box_$s; printf ' %s %ss' "$s" "${!v}"; done); budget $budget s ($((budget / 60)) min $((budget % 60)) s)"
printf 'stage\tbox_s\ttook_s\tstatus\n' > "$LOGS/stages.tsv"

# run_boxed STAGE BOX CMD...: CMD under `timeout`; its status is ok, failed (rc) or out of time.
run_boxed() {
  local stage=$1 box=$2
  shift 2
  local t0=$SECONDS rc status
  timeout --signal=TERM --kill-after=10 "$box" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="out of time" ;;
    *) status="failed (rc $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$stage" "$box" "$((SECONDS - t0))" "$status" >> "$LOGS/stages.tsv"
  echo "== $stage: $status in $((SECONDS - t0)) s (box $box s)"
  return 0
}

stage_build() {
  if [ $DRY = 1 ]; then
    echo "dry run: no GPU build; the installed build:"
    $PY -c "import peftkern; print(peftkern.build_info())"
    return
  fi
  nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the visible GPU's arch only
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    export TORCH_CUDA_ARCH_LIST
  fi
  echo "building for sm_${TORCH_CUDA_ARCH_LIST/./} with $MAX_JOBS jobs"
  # the launcher tests' CMake build (kernels + C++ tests, no torch glue) beside the extension's
  { cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" \
      && cmake --build build-cmake -j "$MAX_JOBS" --target lowrank_launcher_test mask_launcher_test \
        prefix_attention_launcher_test; } > "$LOGS/cmake-build.log" 2>&1 &
  local cmake_pid=$!
  $PY -m pip install --no-build-isolation --no-deps -v -e . > "$LOGS/build.log" 2>&1
  local rc=$?
  wait $cmake_pid || echo "CMake build of the launcher tests failed: see logs/cmake-build.log"
  [ $rc -eq 0 ] || { tail -40 "$LOGS/build.log"; return 1; }
  $PY -c "import peftkern, torch; print(torch.cuda.get_device_name(0), peftkern.build_info())"
}

stage_tests() {
  local xdist=()
  $PY -c "import xdist" 2> /dev/null && xdist=(-n "${PEFTKERN_TEST_PROCS:-8}" --max-worker-restart 8)
  $PY -m pytest tests -m cuda -q -rs -p no:cacheprovider "${xdist[@]}" --case-timeout "$CASE_TIMEOUT" \
    --junitxml="$OUT/pytest.xml" > "$LOGS/pytest.log" 2>&1
  local rc=$?
  tail -15 "$LOGS/pytest.log"
  if [ $DRY = 1 ]; then
    echo "dry run: no launcher tests (CTest)"
  elif [ -d build-cmake ]; then
    (cd build-cmake && timeout 60 ctest --output-on-failure) > "$LOGS/ctest.log" 2>&1 || rc=1
    tail -6 "$LOGS/ctest.log"
  else
    echo "no build-cmake: run the build stage first" | tee "$LOGS/ctest.log"
    rc=1
  fi
  return $rc
}

stage_sanitize() {
  local tool_box=$((box_sanitize - 10)) pids=() tool filter=()
  # check peftkern's kernels only (cuBLAS' and flash attention's uninstrumented: much faster)
  compute-sanitizer --help 2> /dev/null | grep -q -- "--kernel-name " && filter=(--kernel-name kns=peftkern)
  for tool in memcheck racecheck initcheck synccheck; do
    local cmd=(compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 1 --print-limit 200
      "$PY" -m pytest tests/test_sanitize.py -q -p no:cacheprovider)
    if [ $DRY = 1 ]; then
      echo "dry run: would run (box ${tool_box} s): ${cmd[*]}" | tee "$LOGS/sanitize-$tool.log"
      continue
    fi
    (timeout --signal=TERM --kill-after=5 "$tool_box" "${cmd[@]}" > "$LOGS/sanitize-$tool.log" 2>&1
      echo "exit status $?" >> "$LOGS/sanitize-$tool.log") &
    pids+=($!)
  done
  [ $DRY = 1 ] && { $PY -m pytest tests/test_sanitize.py -q -p no:cacheprovider | tail -2; return 0; }
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  grep -H "ERROR SUMMARY\|exit status" "$LOGS"/sanitize-*.log
  ! grep -q "exit status [^0]" "$LOGS"/sanitize-*.log
}

stage_bench() {
  local list=()
  [ $DRY = 1 ] && list=(--list)
  $PY -m bench.run --quick --targets-first --budget-s $((box_bench - 20)) --out "$LOGS/bench" "${list[@]}" \
    > "$LOGS/bench.log" 2>&1
  local rc=$?
  grep -v "^|" "$LOGS/bench.log" | tail -30
  return $rc
}

stage_pack() {
  $PY scripts/gpu_summary.py "$OUT" $([ $DRY = 1 ] && echo --dry-run) > "$OUT/gpu_check.md" || return 1
  local md
  md=$(ls "$LOGS"/bench/*.md 2> /dev/null | head -1)
  [ -n "$md" ] && cp "$md" "$OUT/bench.md"
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
  cat "$OUT/gpu_check.md"
  echo "gpu_check: $(find "$OUT" -type f | wc -l) files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

for s in "${stages[@]}"; do
  v=box_$s
  echo "== $s (box ${!v} s)"
  if [ "$s" = pack ]; then
    export PEFTKERN_GPU_CHECK_STAGES="${stages[*]}"
    export -f stage_pack
    export OUT LOGS PY DRY
    timeout "$box_pack" bash -c stage_pack || { echo "== pack: failed or out of time"; exit 1; }
  else
    export -f "stage_$s" run_boxed
    export OUT LOGS PY DRY MAX_JOBS CASE_TIMEOUT box_sanitize box_bench
    run_boxed "$s" "${!v}" bash -c "stage_$s"
  fi
done
# the exit status says whether the script itself worked; the results are in gpu_check.md
exit 0
