# Keel: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

DEBIAN_PACKAGES := prometheus prometheus-pushgateway

.PHONY: help venv system-deps demo test test-unit typecheck bench pipelines clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv with the pinned dependencies

demo: $(STAMP) ## Run medical_diagnosis end to end, then serve the champion (stop: .venv/bin/keel serve stop)
	$(BIN)/keel run medical_diagnosis
	$(BIN)/keel serve --detach

system-deps: ## Install the Debian packages the tests start (Prometheus, promtool, Pushgateway)
	@if command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	else echo "Install the Debian packages $(DEBIAN_PACKAGES) (as root: make system-deps)"; exit 1; fi

test: $(STAMP) system-deps typecheck ## Run the whole test suite (type check included)
	$(BIN)/pytest $(PYTEST_ARGS)

typecheck: $(STAMP) ## mypy over the keel package
	$(BIN)/mypy platform/keel

test-unit: $(STAMP) ## Run the fast unit tests only
	$(BIN)/pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## Run the benchmarks; each prints a JSON report as its last line
	@for script in tests/benchmarks/bench_*.py; do \
		echo "== $$script"; $(BIN)/python $$script; \
	done

pipelines: $(STAMP) ## Compile every pipeline into pipelines/compiled/
	$(BIN)/keel pipelines compile

clean: ## Remove local state (.keel/) and the virtualenv
	rm -rf .keel $(VENV)
