# plm — the two commands: `make serve` and `make test`. Everything else is a helper of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= small
DEVICE ?= cpu
REPOSITORY ?= repository
PLM_CACHE ?= cache
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9090
export PLM_CACHE

.PHONY: serve test build protos lint format clean help
help:
	@echo "make serve   - install, build the default models on first run (cached), serve on $(HOST):$(PORT)"
	@echo "make test    - install the test tools and run the whole test suite"
	@echo "make build   - (re)build the model repository only;  make lint - ruff, mypy, hadolint, shellcheck"

# grpcio-tools comes first: the package's plm/api is generated from protos/ before the package is installed.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "grpcio-tools>=1.60"

# The stamps re-run pip only when pyproject.toml changes: a second `make serve` starts in seconds.
$(VENV)/.stamp-build: pyproject.toml plm/api/v1/plm_pb2.py | $(PY)
	$(PY) -m pip install -q -e ".[build]"
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-build
	$(PY) -m pip install -q -e ".[build,test,dev]"
	touch $@

plm/api/v1/plm_pb2.py: $(wildcard protos/plm/v1/*.proto protos/triton/*.proto) | $(PY)
	protos/generate.sh $(PY)

protos: plm/api/v1/plm_pb2.py

build: protos
	$(VENV)/bin/plm build --profile $(PROFILE) --device $(DEVICE) --repository $(REPOSITORY)

serve: build
	$(VENV)/bin/plm serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

# The tests that run the real Prometheus server and promtool (tests/test_prometheus.py, one of test_workers.py)
# need Debian's `prometheus` package: `make test` installs it when it can (root with apt-get, as .ci/run does),
# and a run without it ends by naming the files whose tests skipped and the package that brings them back.
HAVE_PROMETHEUS = command -v prometheus >/dev/null && command -v promtool >/dev/null
CAN_APT_INSTALL = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null
PROMETHEUS_TESTS = $$(grep -l 'tool("prom' tests/*.py | tr '\n' ' ')

test: $(VENV)/.stamp-test protos
	@if ! ($(HAVE_PROMETHEUS)) && $(CAN_APT_INSTALL); then \
	  echo "make test: installing Debian's prometheus package (prometheus, promtool) for $(PROMETHEUS_TESTS)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null) || echo "make test: apt-get could not install prometheus"; \
	fi
	@status=0; $(PY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if ! ($(HAVE_PROMETHEUS)); then \
	  echo "make test: without prometheus and promtool the tests that run them skipped (in $(PROMETHEUS_TESTS)-" \
	       "pytest's SKIPPED lines name each): install Debian's prometheus package (apt-get install prometheus;" \
	       "make test does it when run as root)"; \
	fi; \
	exit $$status

lint: $(VENV)/.stamp-test protos
	$(VENV)/bin/ruff check .
	rm -rf build/typecheck && mkdir -p build/typecheck/plm
	for d in service models data export client; do ln -s ../../../$$d build/typecheck/plm/$$d; done
	ln -s ../../../plm/__init__.py ../../../plm/cli.py ../../../plm/api build/typecheck/plm/
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint deploy/Dockerfile deploy/Dockerfile.gpu
	$(VENV)/bin/shellcheck --shell=sh deploy/entrypoint.sh

clean:
	rm -rf $(VENV) plm/api .pytest_cache .mypy_cache .ruff_cache
