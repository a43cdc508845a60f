# Set-up and main commands. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch (CPU build by default; override TORCH_SPEC), the build requirements and
# hbkernels itself (--no-build-isolation: the extension links the installed torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS ?= scikit-build-core>=0.10 pybind11>=2.12 cmeel-eigen>=3.4 ninja
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# Sources whose change needs a rebuild of the extension.
EXT_SOURCES := CMakeLists.txt pyproject.toml $(wildcard csrc/*.cpp csrc/hbk/*.h python/*.cpp cmake/*)

.PHONY: setup install test test-fast demo bench wheel clean

setup: $(VENV)/.deps-stamp
install: $(VENV)/.install-stamp

$(VENV)/.deps-stamp:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(BUILD_DEPS)
	touch $@

# The build dir (build/) is persistent, so a one-file change recompiles one file.
# flock serialises concurrent builds of the same tree.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(EXT_SOURCES)
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/hbk demo --out results/demo

bench: install
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_lanczos.py
	$(PY) bench/bench_alignment.py

wheel: setup
	$(PIP) wheel --no-build-isolation --no-deps -w wheelhouse .

clean:
	rm -rf build wheelhouse build.lock $(VENV)/.install-stamp
