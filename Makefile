# The README's two commands: `make run` and `make test`. Both set up .venv on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
PREVIZ := $(VENV)/bin/previz

.PHONY: setup run test test-all lint format bench

setup:
	@bash scripts/setup.sh

run: setup
	$(PREVIZ) up --config deploy/local.yaml --demo out/previz-demo.mp4

test: setup
	bash scripts/install_prometheus.sh
	bash scripts/install_chromium.sh
	$(PY) -m ruff check pipeline serve tests loadtest
	$(PY) -m ruff format --check pipeline serve tests loadtest
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check pipeline serve tests loadtest

format: setup
	$(PY) -m ruff format pipeline serve tests loadtest
	$(PY) -m ruff check --fix pipeline serve tests loadtest
