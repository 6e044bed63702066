#!/usr/bin/env bash
# On a GPU machine with torch already installed and no network: build peftkern from source, run
# every test (the CUDA ones included) and the C++ launcher test, then the benchmarks. Logs and
# result files go to $OUT (default ./gpu_check_out).
#   scripts/gpu_check.sh [build] [test] [ctest] [bench] [bench-full]    (default: build test bench)
# Stages are separate so each fits a short remote session; `build` must run first on a fresh machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the visible GPU's arch
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench)
status=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  case "$stage" in
    build)
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
      $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
        || { tail -60 "$OUT/build.log"; exit 1; }
      $PY -c "import peftkern, torch; print(torch.cuda.get_device_name(0), peftkern.build_info())" ;;
    test)
      $PY -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    ctest)
      { cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" && cmake --build build-cmake -j "$MAX_JOBS" \
          && (cd build-cmake && ctest --output-on-failure); } > "$OUT/ctest.log" 2>&1 || status=1
      tail -30 "$OUT/ctest.log"
      $PY -m pip install --no-build-isolation --no-deps -e . > /dev/null 2>&1 ;;  # back to the setuptools build
    bench)
      $PY -m bench.run --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" ; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    bench-full)
      $PY -m bench.run --out "$OUT" 2>&1 | tee "$OUT/bench-full.log" | grep -v "^|" ; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
