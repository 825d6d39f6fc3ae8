# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv, install torch from the pinned build, then frmap with its engine, serve, test
# and docs extras. `make test-core` checks the core install alone (numpy, no torch) in
# .venv-core. `make docs` builds the documentation site with warnings as errors.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE_VENV ?= .venv-core
CORE_BIN := $(CORE_VENV)/bin
WHEELS := build/wheels
SOURCES := pyproject.toml CMakeLists.txt $(shell find kernels engine bench -name '*.py' -o -name '*.cpp' -o -name '*.safetensors' -o -name '*.json')

.PHONY: install demo test test-core bench docs docs-tables

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q ".[engine,serve,test,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/frmap demo

test: install
	$(BIN)/python -m pytest -q --durations=30
	$(BIN)/lint-imports

# The wheel alone with the op's test tools (scikit-image is the oracle): tests/core must pass
# without torch, and must not be empty (pytest exits 5 when it collects nothing).
test-core: install
	rm -rf $(CORE_VENV) $(WHEELS)
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) .
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_BIN)/python -m pip install -q $(WHEELS)/frmap-*.whl scikit-image pillow pytest hypothesis
	@if $(CORE_BIN)/python -c "import torch" 2>/dev/null; then \
		echo "test-core: torch is importable in $(CORE_VENV); the core run must be torch-free" >&2; \
		exit 1; fi
	$(CORE_BIN)/python -m pytest -q tests/core

bench: install
	$(BIN)/python -m pytest bench --benchmark-only

# The site: first the check that every generated table matches its JSON (docs/results/), then
# MkDocs with warnings as errors (the API reference reads the installed package's docstrings).
docs: install
	$(BIN)/python docs/render.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Regenerate the tables of README.md and docs/ from docs/results/*.json (the standard library
# alone: no install needed).
docs-tables:
	$(PYTHON) docs/render.py
