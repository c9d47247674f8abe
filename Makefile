# kdq: a newcomer needs two commands, `make demo` and `make test`; both install what is missing.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --frozen
PRESET ?= demo

.PHONY: setup demo test lint format bench clean help

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup:  ## Install uv (with pip) if missing, then the locked environment in .venv
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@$(UV) sync --frozen --quiet

demo: setup  ## The whole job offline on the embedded digits dataset: teacher, baseline, KD student, table
	$(RUN) kdq pipeline --preset $(PRESET) --run-dir runs/$(PRESET) --resume

test: setup lint  ## Lint, then the test suite
	$(RUN) pytest

lint: setup  ## ruff lint + format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup  ## Apply ruff's fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

clean:  ## Remove run outputs (keeps .venv)
	rm -rf runs
