# The front door. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE ?= $(HOME)/.cache/rlhf-operator
LOCKS := images/operator/requirements.txt images/stages/requirements.txt tests/requirements-dev.txt
# The virtualenv lives outside the clone, keyed by the lock files, so fresh clones reuse it.
VENV := $(CACHE)/venv-$(shell cat $(LOCKS) | sha256sum | cut -c1-12)
PY := $(VENV)/bin/python
PYTHON ?= python3
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/stages
export PIP_DISABLE_PIP_VERSION_CHECK := 1
PYTEST_ARGS ?=
# Everything ruff checks and formats.
PY_PATHS := operator stages tests images benchmarks

.PHONY: help setup venv controlplane charttools s3server kueue kwok demo test test-serial test-fast cluster bench-operator bench-gpu bench-watch lint fmt generate verify clean

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(VENV)/.complete: $(LOCKS)
	@echo "preparing $(VENV) (installs only on first use or when a lock file changes)"
	@# Never delete a venv in place: other processes (a running demo, a test) may be using it.
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(addprefix -r ,$(LOCKS))
	touch $@

venv: $(VENV)/.complete ## create the Python environment (cached outside the clone)
	ln -sfn $(VENV) .venv

controlplane: ## build etcd, kube-apiserver and kubectl from their Go modules (cached)
	bash tests/controlplane/build.sh >/dev/null

charttools: ## build helm and kubeconform from their Go modules (cached)
	bash tests/tools/build.sh >/dev/null

s3server: ## build SeaweedFS, the S3 server the publish stage's tests upload to, from its Go module (cached)
	bash tests/s3/build.sh >/dev/null

kueue: ## build Kueue's manager from its Go module, for the node tier's Kueue tests (cached)
	bash tests/kueue/build.sh >/dev/null

kwok: ## build KWOK from its Go module, the load benchmark's simulated kubelet (cached)
	bash tests/kwok/build.sh >/dev/null

# Every Go build happens here, before any test starts: a cold Kueue build took 54 min beside the
# suite's five parts on 2 cores (2026-12-01) and ran out the timeout of the test that waited for it.
setup: venv controlplane charttools s3server kueue kwok ## everything the demo and the tests need

demo: venv ## run a complete tiny RLHF pipeline locally on the CPU and write a report
	$(PY) -m rlhf_operator.cli quickstart --workdir $(or $(WORKDIR),$(CURDIR)/.quickstart)

test: setup ## run the whole test suite: the node tier, tests/stages in two parts, tests/operator and the rest side by side
	$(PY) -m tests.run_suite -- $(PYTEST_ARGS)

test-serial: setup ## the whole suite in one pytest process (as plain `pytest` from the root runs it)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## the inner loop: no training, no node, no fault injection; three parts side by side
	$(PY) -m tests.run_suite --fast -- $(PYTEST_ARGS)

cluster: venv controlplane ## a real single-node cluster (root; builds the images on first use); Ctrl-C stops it
	$(PY) -m rlhf_operator.dev.cluster $(or $(WORKDIR),$(CURDIR)/.rlhf-cluster)

bench-operator: venv controlplane charttools ## the operator under load (KWOK nodes); BENCH_ARGS="--sizes 100,1000"
	$(PY) benchmarks/operator_load.py $(BENCH_ARGS)

bench-gpu: venv ## QLoRA SFT, PPO vs TRL 1.12, NF4, checkpoint saves on OPT-1.3B (CUDA); BENCH_ARGS="--dry-run" on CPU
	$(PY) benchmarks/gpu.py $(BENCH_ARGS)

bench-watch: venv ## the watch's detectors across seeds on a sound and an exploitable reward model (CPU, ~20 min); BENCH_ARGS="--methods RLOO --seeds 0"
	$(PY) benchmarks/watch_seeds.py --work $(or $(WORKDIR),$(CURDIR)/.watch-seeds) $(BENCH_ARGS)

lint: venv ## ruff check and format, mypy and import-linter (module layering)
	$(PY) -m ruff check $(PY_PATHS)
	$(PY) -m ruff format --check $(PY_PATHS)
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

fmt: venv ## format the code
	$(PY) -m ruff format $(PY_PATHS)
	$(PY) -m ruff check --fix $(PY_PATHS)

generate: venv ## regenerate the CRD, the chart's CRD, docs/reference.md and the chart's values table
	$(PY) -m rlhf_api.generate
	$(PY) tests/chart/valuesdoc.py

verify: venv lint ## fail if a generated file is stale, or lint fails
	$(PY) -m rlhf_api.generate --check
	$(PY) tests/chart/valuesdoc.py --check

clean: ## remove local outputs (not the caches)
	rm -rf .quickstart .pytest_cache .mypy_cache .ruff_cache .venv
