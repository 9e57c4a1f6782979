# kappa-dagster: `make demo` tells the whole story, `make test` runs the full suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.DEFAULT_GOAL := help
.PHONY: demo-stop help install browser dashboard stack-up stack-down stack-status test test-fast lint demo dagster-dev bench bench-memory soak reliability-figures clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

install: $(BIN)/.installed $(DAGSTER_HOME)/dagster.yaml ## Create the virtualenv and install the project

CHROMIUM ?= /usr/bin/chromium

browser: ## Install Debian's chromium for the browser test (only if it is missing)
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; fi

stack-up: install ## Fetch jars (once) and start the local Kafka broker + S3 server
	$(BIN)/kappa stack up

stack-down: install ## Stop the local stack (data is kept)
	$(BIN)/kappa stack down

stack-status: install ## Show what runs where
	$(BIN)/kappa stack status

# Tests run side by side on one shared stack (each test has its own topics, bucket and group prefix);
# most of a test's time is waiting for Kafka, S3 and the workers it starts. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: install browser ## Run the full test suite against the real stack (lists its 15 slowest tests)
	$(BIN)/pytest -m "not soak" -n $(TEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# Figures only from a fully green run: pytest writes them to a temp file, moved into docs/ only if it
# exits 0; docs/RELIABILITY.md is then regenerated from the figures JSON (tests/reliability/render_doc.py).
define green_figures
	@figures=$$(mktemp --suffix=.json); \
	if KAPPA_RELIABILITY_FIGURES=$$figures $(BIN)/pytest -m "$(1)" $(3) $(PYTEST_ARGS); then \
		mv $$figures $(2) && echo "figures of this green run: $(2)"; \
	else \
		echo "reliability run not green: $(2) left as it was (this run's figures: $$figures)"; exit 1; \
	fi
	$(BIN)/python -m tests.reliability.render_doc
endef

soak: install ## Long reliability variants (20 kills per worker, 30 s S3 outage, 2400 fuzzed records); green -> docs/reliability-figures-soak.json + RELIABILITY.md
	$(call green_figures,soak,docs/reliability-figures-soak.json,tests)

reliability-figures: install ## Default reliability run; only a green run updates docs/reliability-figures.json and regenerates docs/RELIABILITY.md
	$(call green_figures,not soak,docs/reliability-figures.json,tests/reliability)

test-fast: install ## Run the tests that need no stack
	$(BIN)/pytest tests/test_config.py $(PYTEST_ARGS)

lint: install ## ruff + Dagster definitions validation
	$(BIN)/ruff check .
	$(BIN)/dagster definitions validate -w workspace.yaml

demo: install ## Start the stack and run the whole story end to end (leaves workers + dashboard running)
	$(BIN)/python -m workers.dev.demo

demo-stop: install ## Stop the demo's workers and dashboard (the stack keeps running)
	$(BIN)/python -m workers.dev.demo stop

dashboard: install ## Live dashboard on http://127.0.0.1:8050 (read-only)
	$(BIN)/kappa dashboard --host 127.0.0.1 --port 8050

dagster-dev: install ## Dagster UI + daemon on http://127.0.0.1:3000
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

$(BIN)/.bench-installed: pyproject.toml benchmarks/requirements-quix.txt | $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(PYTHON) -m venv benchmarks/.venv-quix
	benchmarks/.venv-quix/bin/pip install -q --upgrade pip
	benchmarks/.venv-quix/bin/pip install -q -r benchmarks/requirements-quix.txt
	@touch $@

bench: install $(BIN)/.bench-installed ## Ratios vs Kafka perf tools + Quix Streams, 5 runs, <= 20 min (BENCH_ARGS="--quick")
	$(BIN)/kappa stack up
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-memory: install $(BIN)/.bench-installed ## Peak RSS at 1M and 10M events, live + bounded paths (~10 min)
	$(BIN)/kappa stack up
	$(BIN)/python -m benchmarks --scenarios memory $(BENCH_ARGS)

clean: ## Remove the virtualenv and local Dagster state (stack data is kept)
	rm -rf $(VENV) .dagster_home .pytest_cache .ruff_cache benchmarks/.venv-quix
