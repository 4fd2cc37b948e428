# Two commands for a fresh clone: `make demo` and `make test`. Each creates .venv when
# missing, installs the CPU build of torch from the local wheel cache first, then the
# package (building the kasmina._C extension), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= /usr/local/cuda
STAMPS := .make-stamps
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: test test-fallback test-slow demo build bench cuda-check lint codegen clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=64" wheel ninja
	$(PY) -m pip install -q torch==$(TORCH_VERSION)

$(STAMPS)/install: $(PY) pyproject.toml setup.py $(CSRC) | $(STAMPS)
	flock $(STAMPS)/build.lock $(PY) -m pip install -q --no-build-isolation -e '.[test,demo]'
	touch $@

$(STAMPS):
	mkdir -p $@

build: $(STAMPS)/install

codegen: $(PY)
	$(PY) -m codegen

lint: build
	$(PY) -m ruff check .

# The suite must run against the compiled extensions: without them their tests skip and
# the rest pass on the pure-torch / pure-Python fallbacks, which test-fallback covers.
test: build
	$(PY) -m codegen --check
	$(PY) -m ruff check .
	$(PY) -c "import sys, kasmina._extension as e; e.HAS_EXTENSION or sys.exit('make test needs the compiled extension; the backend is the ' + e.backend_description())"
	$(PY) -c "import sys, kasmina._extension as e; e.FILEIO or not sys.platform.startswith('linux') or sys.exit('make test needs kasmina._fileio on Linux (pip install -e . builds it)')"
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite on the pure-torch fallback (what runs where the extension cannot be built).
test-fallback: build
	KASMINA_DISABLE_EXTENSION=1 $(PY) -m pytest $(PYTEST_ARGS)

# The long explorations (pytest -m slow); CI runs them after `make test`.
test-slow: build
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/kasmina demo

bench: build
	$(PY) -m benchmarks

# Compiles and links the CUDA kernels (cannot run them without a GPU).
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "setuptools>=64" wheel ninja pyyaml jsonschema numpy torch==$(CUDA_TORCH_VERSION)
	rm -rf build/cuda-check
	cd . && CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH TORCH_CUDA_ARCH_LIST=9.0 KASMINA_CUDA=1 \
	  KASMINA_CUDA_EXTRA_INCLUDE=$$($(CUDA_VENV)/bin/python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))") \
	  MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py build_ext --build-temp build/cuda-check/temp --build-lib build/cuda-check/lib
	@echo "cuda-check: the CUDA extension compiled and linked"

clean:
	rm -rf build $(STAMPS) kasmina/_C*.so
