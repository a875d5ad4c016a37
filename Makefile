# Fashion-MNIST tuning pipeline. `make help` lists the targets.
# Every target installs what it needs on first use (.venv, packages, dataset).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install data train test bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED) ## create .venv and install the project in it (skipped when up to date)

data: $(INSTALLED) ## make Fashion-MNIST available and verify it
	@$(PY) -m pipeline data

train: data ## train the notebook's MLP once and report train/validation/test accuracy (ARGS="--set lr=0.003")
	$(PY) -m pipeline train $(ARGS)

test: data ## run the test suite (includes the real-data tests)
	$(PY) -m pytest $(ARGS)

bench: data ## throughput against the notebook's DataLoader loop, and time to 90.30 % test accuracy
	$(PY) benchmarks/bench_train.py $(ARGS)

clean: ## remove the virtualenv and generated state (keeps studies/*.toml)
	rm -rf $(VENV) data reports
