# plm — the two commands: `make serve` and `make test`. Everything else is a helper of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= small
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
	$(VENV)/bin/plm build --profile $(PROFILE) --repository $(REPOSITORY)

serve: build
	$(VENV)/bin/plm serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: $(VENV)/.stamp-test protos
	$(PY) -m pytest $(PYTEST_ARGS)

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
