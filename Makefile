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
UI_PORT ?= 5000
# MLflow: $MLFLOW_TRACKING_URI when set (an `mlflow server`, say), else the local store under mlruns/.
TRACKING_URI = $(or $(MLFLOW_TRACKING_URI),sqlite:///mlruns/mlflow.db)
export MLFLOW_DISABLE_TELEMETRY = true
# The studies' storage: STORAGE=... for make, else $OPTUNA_STORAGE, else the SQLite file under studies/.
TUNE_STORAGE = $(or $(STORAGE),$(OPTUNA_STORAGE),sqlite:///studies/optuna.db)

.DEFAULT_GOAL := help
.PHONY: help install data train tune evaluate-best dashboard ui test bench clean

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

evaluate-best: data ## the champion on the test set: terminal report, reports/<model>-v<N>/report.html, MLflow run
	$(PY) -m pipeline evaluate-best --prune-sweep $(ARGS)

dashboard: $(INSTALLED) ## optuna-dashboard for every study on 127.0.0.1 (DASHBOARD_PORT=8080)
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $(TUNE_STORAGE)

ui: $(INSTALLED) ## the MLflow UI on the tracking store, at 127.0.0.1 (UI_PORT=5000)
	$(VENV)/bin/mlflow server --backend-store-uri $(TRACKING_URI) --default-artifact-root ./mlruns/artifacts \
		--host 127.0.0.1 --port $(UI_PORT)

test: data ## run the test suite (includes the real-data tests)
	$(PY) -m pytest $(ARGS)

bench: data ## trainer vs the notebook's loop, time to 90.30 % test accuracy, MLflow's cost to a study
	$(PY) benchmarks/bench_train.py $(ARGS)
	$(PY) benchmarks/bench_tracking.py

clean: ## remove the virtualenv, data/ and reports/ (keeps studies and mlruns)
	rm -rf $(VENV) data reports
