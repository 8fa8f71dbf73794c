# Quickstart: `make demo` (set up, fetch the default model, export it, chat) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ONNXLM_HOME ?= $(HOME)/.cache/onnxlm
export ONNXLM_HOME
BUNDLE ?= $(ONNXLM_HOME)/bundles/smollm2
QUESTION ?= What are three tips for writing a clear email to a customer?

.PHONY: demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned in the `export` extra to the CPU build (an unpinned torch pulls a CUDA build).
$(VENV)/.export-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[export]'
	touch $@

$(VENV)/.dev-installed: $(VENV)/.export-installed
	$(BIN)/pip install -q -e '.[export,dev]'
	touch $@

demo: $(VENV)/.export-installed
	$(BIN)/onnxlm pull smollm2
	@test -f $(BUNDLE)/onnxlm.json || $(BIN)/onnxlm export smollm2 -o $(BUNDLE)
	$(BIN)/onnxlm info $(BUNDLE)
	$(BIN)/onnxlm generate $(BUNDLE) --chat "$(QUESTION)" --max-new-tokens 128

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check onnxlm tests benchmarks
	$(BIN)/ruff format --check onnxlm tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
