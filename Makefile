# The README's two commands are `make run` and `make test`; both build the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/dev.lock | cksum | cut -d' ' -f1)

.PHONY: install run demo test test-floors lint format lock bench microbench chart docker-lint soak clean

install: $(STAMP)

# Exactly the versions the image ships (requirements/dev.lock pins the image's lock and the test tools).
$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint requirements/dev.lock -e '.[test,lint]'
	rm -f $(VENV)/.installed-* && touch $@

# The locks, from pyproject.toml's ranges (README "Deployment"): the image's two (hashed; with the otlp
# extra, then without it from the same pins) and dev.lock, which takes the image's pins and adds the test
# and lint tools. Pins already
# in a lock are kept while they satisfy the ranges; `make lock LOCK_ARGS=--upgrade` moves all to the newest.
# Not after `install`: a range just changed in pyproject.toml may exclude a pin the constraints still hold.
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --quiet $(LOCK_ARGS)
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv==0.13.8'
	$(UV_COMPILE) --generate-hashes --extra otlp -o requirements/image-otlp.lock
	$(UV_COMPILE) --generate-hashes -c requirements/image-otlp.lock -o requirements/image.lock
	$(UV_COMPILE) --extra otlp --extra test --extra lint -c requirements/image-otlp.lock -o requirements/dev.lock

# The demo: redis-server, the reference Django backend and edge-proxy, with SDK clients polling through it
# for ~20 s and a live summary (`make run DEMO_ARGS="--seconds 60 --clients 24"`). Stops all it started.
run demo: $(STAMP)
	$(PY) -m examples.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

# The suite again with the runtime dependencies at pyproject.toml's floors (uv's lowest-direct resolution,
# the otlp extra included), in a virtualenv of its own; the test tools as dev.lock pins them. The ranges
# promise every version in them, and the locks hold the newest. tests/test_locks.py checks each runtime
# dependency really is at its floor there. Unclosed sockets are the main run's to find (its ResourceWarnings
# are errors): here a reviewer saw 36 Redis connections an earlier test left to the collector (redis-py 8.1)
# fail whichever test the collection fell in, once in four runs.
FLOORS_VENV ?= .venv-floors
test-floors: $(STAMP)
	$(PY) -m pip install --quiet 'uv==0.13.8'
	rm -rf $(FLOORS_VENV)
	$(VENV)/bin/uv venv --quiet --seed --python $(PY) $(FLOORS_VENV)
	$(VENV)/bin/uv pip compile pyproject.toml --quiet --python-version 3.11 --resolution lowest-direct \
		--extra otlp -o $(FLOORS_VENV)/floors.txt
	$(PY) scripts/floor_constraints.py $(FLOORS_VENV)/floors.txt > $(FLOORS_VENV)/tools.txt
	$(VENV)/bin/uv pip install --quiet --python $(FLOORS_VENV)/bin/python -e '.[test]' \
		-c $(FLOORS_VENV)/floors.txt -c $(FLOORS_VENV)/tools.txt
	EDGE_PROXY_TEST_FLOORS=1 $(FLOORS_VENV)/bin/python -m pytest -W ignore::ResourceWarning

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy tests bench scripts examples
	$(VENV)/bin/ruff format --check proxy tests bench scripts examples
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix proxy tests bench scripts examples
	$(VENV)/bin/ruff format proxy tests bench scripts examples

# Benchmark (needs wrk; nginx optional): proxy vs the Django backend, an aiohttp ceiling and nginx, ~24 min;
# `make bench BENCH_ARGS=--quick` (~3 min), or e.g. BENCH_ARGS="--scenarios 200,304 --sizes 50k".
bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v nginx >/dev/null || apt-get install -y -qq nginx-light || echo "no nginx: that row is skipped"
	$(PY) bench/run.py $(BENCH_ARGS)

# The hot functions timed by pytest-benchmark; each run is saved under .benchmarks/ and compared with the last.
microbench: $(STAMP)
	$(PY) -m pytest tests/test_hot_functions.py --benchmark-enable --benchmark-autosave \
		--benchmark-columns=min,median,ops $(MICROBENCH_ARGS)

# Helm chart checks (lint, render, kubernetes-validate, check-config); .ci/chart-tools.sh pins and caches the tools in .tools/.
chart: $(STAMP)
	.ci/chart-tools.sh
	EDGE_PROXY_CHART_TOOLS=required $(PY) -m pytest tests/test_chart.py

docker-lint:
	.ci/chart-tools.sh
	.tools/bin/hadolint Dockerfile

# Soak (README "Failure modes"): 30 minutes at a steady rate by default; `make soak SOAK_ARGS="--minutes 5"`.
soak: $(STAMP)
	$(PY) -m tests.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
