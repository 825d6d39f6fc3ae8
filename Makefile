# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv, install torch from the pinned build, then frmap with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := pyproject.toml CMakeLists.txt $(shell find kernels engine bench -name '*.py' -o -name '*.cpp' -o -name '*.safetensors' -o -name '*.json')

.PHONY: install demo test bench

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/frmap demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pytest bench --benchmark-only
