# The two commands on a fresh machine:  make bench   (the benchmark table; needs a CUDA GPU)
#                                       make test    (the test suite; CUDA tests skip without a GPU)
# Each creates .venv, installs torch and the tools, and builds peftkern from source.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: venv build test bench bench-full cmake-build cmake-test clean

venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" numpy pytest pytest-benchmark ninja cmake pybind11 setuptools wheel
	$(PY) -m pip install peft transformers  # interop tests and the peft benchmark provider
	touch $@

build: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import peftkern; print('peftkern build:', peftkern.build_info())"

test: build
	$(PY) -m pytest tests -q -rs

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
