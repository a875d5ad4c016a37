# Fashion-MNIST tuning pipeline. `make help` lists the targets.
# Every target installs what it needs on first use (.venv, packages, dataset).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-stamp
ARGS ?=
STUDY ?= mlp
WORKERS ?= 1
DASHBOARD_PORT ?= 8080
# The studies' storage: STORAGE=... for make, else $OPTUNA_STORAGE, else the SQLite file under studies/.
TUNE_STORAGE = $(or $(STORAGE),$(OPTUNA_STORAGE),sqlite:///studies/optuna.db)

.DEFAULT_GOAL := help
.PHONY: help install data train tune dashboard test bench clean

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

tune: data ## run or resume a study: STUDY=mlp|mlp-random|cnn TRIALS=n TIMEOUT=s WORKERS=k STORAGE=url
	$(PY) -m pipeline tune --study $(STUDY) --workers $(WORKERS) --storage $(TUNE_STORAGE) \
		$(if $(TRIALS),--trials $(TRIALS)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(ARGS)

dashboard: $(INSTALLED) ## optuna-dashboard for every study on 127.0.0.1 (DASHBOARD_PORT=8080)
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $(TUNE_STORAGE)

test: data ## run the test suite (includes the real-data tests)
	$(PY) -m pytest $(ARGS)

bench: data ## throughput against the notebook's DataLoader loop, and time to 90.30 % test accuracy
	$(PY) benchmarks/bench_train.py $(ARGS)

clean: ## remove the virtualenv and generated state (keeps studies/*.toml)
	rm -rf $(VENV) data reports
