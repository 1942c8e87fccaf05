# The two set-up commands of the README. Each installs what it needs into .venv first.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: age-up daemon test test-fast install-gpu

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

## one whole age-up of the embedded SmolLM2-135M-Instruct, in a few minutes (--quick)
age-up: $(STAMP)
	$(VENV)/bin/evolve age-up --quick

## the daemon beside a chat agent: serves generation 0 (built on first start), ages up on karma
daemon: $(STAMP)
	$(VENV)/bin/python run_daemon.py --start-gen 0 --quick

## the full test suite, slow real-model tests included (what CI runs)
test: $(STAMP)
	$(VENV)/bin/python -m pytest

## the fast hermetic tests only
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

## a CUDA host: torch's CUDA build, Unsloth (the gpu extra) and llama.cpp built with CUDA, into .venv
install-gpu:
	bash scripts/install.sh --gpu $(VENV)
	touch $(STAMP)
