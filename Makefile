# The two commands (see README): `make demo` and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch: an unpinned torch would pull gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo chaos test lint install bench bench-notices clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/spotsafe drill

chaos: $(BIN)/.installed
	$(BIN)/spotsafe demo

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/run.py

bench-notices: $(BIN)/.installed
	$(BIN)/python bench/notices.py

clean:
	rm -rf $(VENV) spotsafe-demo spotsafe-drill .spotsafe .bench .pytest_cache .mypy_cache .ruff_cache
