# The README's two commands are `make run` and `make test`; both build the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/edge-proxy serve --config config/edge-proxy.yaml

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy tests bench scripts
	$(VENV)/bin/ruff format --check proxy tests bench scripts
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix proxy tests bench scripts
	$(VENV)/bin/ruff format proxy tests bench scripts

# Benchmark (needs wrk; nginx optional): `make bench`, or `make bench BENCH_ARGS=--quick` for a smoke run.
bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v nginx >/dev/null || apt-get install -y -qq nginx-light || echo "no nginx: that row is skipped"
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
