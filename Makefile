# `make demo` and `make test` work on a fresh machine: they create .venv and install
# dsjax (editable, with the test extras) when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/dsjax-train --model cnn-digits --workdir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal

# The quick subset (under 3 minutes on 2 cores): everything but the tests marked slow.
test-fast: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow and not gpu and not tpu"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
