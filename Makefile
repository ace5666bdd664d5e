# The README's two commands: `make demo` (set up, then build the embedded example) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup setup-test demo test test-fast bench clean

# torch first, pinned: that exact version takes the local CPU wheel; anything looser pulls CUDA.
$(BIN)/.edgepack-installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The test set-up adds the TFLite extra (litert-torch, ~2 GB) and Debian packages for the SSH and
# aarch64-emulation tests (openssh-server, qemu-user-static).
$(BIN)/.edgepack-test-installed: $(BIN)/.edgepack-installed
	$(BIN)/pip install -q -c constraints.txt -e '.[test,tflite]'
	bash scripts/install-system-deps.sh
	touch $@

setup: $(BIN)/.edgepack-installed
setup-test: $(BIN)/.edgepack-test-installed

demo: setup
	$(BIN)/edgepack build --target x86

# Two pytest-xdist workers (the CI has two cores); worksteal evens out the long end-to-end tests.
PYTEST_WORKERS ?= 2

test: setup-test
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal --durations=12

test-fast: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m "not slow"

bench: setup-test
	$(BIN)/python bench/int8_speed.py

clean:
	rm -rf dist .pytest_cache
