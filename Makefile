# chatforge: `make run` trains the CPU demo end to end; `make test` runs the test suite.
# Both create .venv and install everything on first use; nothing else is needed first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a GPU machine set TORCH=torch (or preinstall a CUDA build in .venv).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
RECIPE ?= cpu-demo
ARGS   ?=

.PHONY: setup run test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/chatforge speedrun --recipe $(RECIPE) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/time_to_loss.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
