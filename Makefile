# Two quickstart commands: `make demo` and `make test`. Everything installs itself.
SHELL := /bin/bash
VENV := .venv
UV := .tools/bin/uv
CHURN := $(VENV)/bin/churn
PYTEST := $(VENV)/bin/pytest
# Tests run their own services on other ports and another state folder, so a demo can keep running.
# TEST_PORT_OFFSET moves every test port at once (two checkouts testing side by side: 1000, 2000...).
TEST_PORT_OFFSET ?= 0
test_port = $(shell echo $$(( $(1) + $(TEST_PORT_OFFSET) )))
TEST_ENV := CHURN_STATE_DIR=.state/test CHURN_KAFKA_PORT=$(call test_port,19092) \
	CHURN_KAFKA_CONTROLLER_PORT=$(call test_port,19093) CHURN_REDIS_PORT=$(call test_port,16379) \
	CHURN_PROMETHEUS_PORT=$(call test_port,19090) CHURN_API_PORT=$(call test_port,18000) \
	CHURN_SCORER_METRICS_PORT=$(call test_port,19108) CHURN_ARCHIVER_METRICS_PORT=$(call test_port,19109)

.PHONY: help setup demo test test-soak test-cluster test-env unit integration lint format bench infra-up infra-down infra-status clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(UV):
	python3 -m venv .tools
	.tools/bin/pip install -q --disable-pip-version-check uv==0.13.8

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python python3
	touch $@

setup: $(VENV)/.installed ## create the virtualenv from the lock file and install local services
	$(CHURN) infra up

demo: setup ## run the whole system end to end on local real services
	$(CHURN) demo

test: $(VENV)/.installed ## unit + integration tests against real Kafka, Redis and Prometheus
	$(TEST_ENV) $(CHURN) infra up
	$(TEST_ENV) CI=$${CI:-false} $(PYTEST) --durations=15 -m "not soak and not cluster" tests

test-soak: $(VENV)/.installed ## the long tests: SIGKILL fault suite, multi-day monitoring streams (minutes each)
	$(TEST_ENV) $(CHURN) infra up
	$(TEST_ENV) CI=$${CI:-false} $(PYTEST) -m soak tests

test-cluster: $(VENV)/.installed ## the system on a local 3-broker Kafka and Redis Cluster, brokers and masters SIGKILLed (minutes)
	$(TEST_ENV) $(CHURN) infra up
	$(TEST_ENV) $(CHURN) infra up --cluster
	$(TEST_ENV) CI=$${CI:-false} $(PYTEST) -m cluster tests

test-env: ## print the test services' environment variables (to run one test file against them)
	@echo $(TEST_ENV)

unit: $(VENV)/.installed ## unit tests only (no services)
	$(PYTEST) tests/unit

lint: $(VENV)/.installed ## ruff lint + format check, mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup ## benchmarks, each printing JSON figures
	$(CHURN) bench produce
	$(CHURN) bench features
	$(CHURN) bench train
	$(CHURN) bench stream
	$(CHURN) bench api

infra-up: $(VENV)/.installed ## start local Kafka, Redis, Prometheus (demo ports)
	$(CHURN) infra up

infra-down: $(VENV)/.installed ## stop them (and the test ones)
	$(CHURN) infra down
	$(TEST_ENV) $(CHURN) infra down

infra-status: $(VENV)/.installed ## report each local service
	$(CHURN) infra status

clean: infra-down ## stop services and delete state, virtualenvs and caches
	rm -rf .state .venv .tools .mypy_cache .ruff_cache .pytest_cache
