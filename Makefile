# The two commands (see README): `make demo` and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch: an unpinned torch would pull gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for `make test`; each test file runs whole on one worker (its module fixtures are shared).
TEST_WORKERS ?= 2
# Azurite, Microsoft's Azure Storage emulator (npm), for the az:// storage tests; installed into .tools/.
AZURITE_SPEC ?= azurite@3.37.0
AZURITE := .tools/node_modules/.bin/azurite-blob

.PHONY: demo chaos test package-check lint install azurite bench bench-notices bench-resume bench-keras bench-sharded bench-gpu bench-batch bench-first-step bench-goodput bench-gpu-save clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed azurite

# Without Node.js and npm the Azure storage tests are skipped (they say why); with them, a failed install fails.
azurite:
	@if [ -x $(AZURITE) ] && [ -f .tools/.$(AZURITE_SPEC) ]; then :; \
	elif command -v npm >/dev/null && command -v node >/dev/null; then \
		npm install --prefix .tools --no-audit --no-fund --loglevel=error "$(AZURITE_SPEC)" && touch ".tools/.$(AZURITE_SPEC)"; \
	else echo "node/npm not found: the Azure storage tests (Azurite) will be skipped"; fi

demo: $(BIN)/.installed
	$(BIN)/spotsafe drill

chaos: $(BIN)/.installed
	$(BIN)/spotsafe demo

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench
	$(BIN)/mypy

test: lint azurite
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not package"

# The package a user installs: wheel + sdist (python -m build), twine check, and the wheel in a clean venv
# (torch from $(TORCH_SPEC)) running `spotsafe --version`, a drill of the example job and the s3 extra; and the
# launcher examples checked by SkyPilot's and the kubernetes client's own code, in a venv of their own.
package-check: $(BIN)/.installed
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/pytest -q -m package tests/test_package.py tests/test_launchers.py

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/run.py

bench-notices: $(BIN)/.installed
	$(BIN)/python bench/notices.py

bench-resume: $(BIN)/.installed
	$(BIN)/python bench/resume_skip.py

bench-keras: $(BIN)/.installed
	$(BIN)/python bench/keras_skip.py

bench-sharded: $(BIN)/.installed
	$(BIN)/python bench/sharded.py

bench-gpu: $(BIN)/.installed
	$(BIN)/python bench/gpu_sharded.py

bench-batch: $(BIN)/.installed
	$(BIN)/python bench/batch.py

bench-first-step: $(BIN)/.installed
	$(BIN)/python bench/first_step.py --one-stream

bench-goodput: $(BIN)/.installed
	$(BIN)/python bench/goodput.py

bench-gpu-save: $(BIN)/.installed
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) .tools spotsafe-demo spotsafe-drill .spotsafe .bench .pytest_cache .mypy_cache .ruff_cache
