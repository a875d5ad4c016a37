# Fashion-MNIST tuning pipeline. `make help` lists the targets.
# Every target installs what it needs on first use (.venv, packages, dataset).
#
# Stores: the Python side owns the defaults and their precedence (pipeline/stores.py). STORAGE, when
# you set it, reaches Python as $OPTUNA_STORAGE in the environment, never on a command line (make's
# echo and `ps` would show its password); else $OPTUNA_STORAGE / $MLFLOW_TRACKING_URI, else the files
# under studies/ and mlruns/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-stamp
ARGS ?=
# STUDY, SEED, TRIALS, TIMEOUT, WORKERS and the *_PORT variables are passed on only when set: their
# defaults live once, in `python -m pipeline <command> --help`. HOST counts only on make's command line:
# tcsh and others export HOST=<hostname>, which must not open the services to a network.
export MLFLOW_DISABLE_TELEMETRY = true
ifdef STORAGE
export OPTUNA_STORAGE = $(STORAGE)
endif

.DEFAULT_GOAL := help
.PHONY: help install data train tune baseline evaluate-best compare dashboard ui serve services services-stop services-status \
	test test-fast smoke bench bench-storage bench-tracking-scale bench-evaluate clean

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

train: data ## train once, report train/validation/test accuracy: the notebook's MLP, or RECIPE=fast-cnn (ARGS="--set lr=0.003")
	$(PY) -m pipeline train $(if $(RECIPE),--recipe $(RECIPE)) $(ARGS)

tune: data ## run or resume a study: STUDY=mlp|mlp-random|mlp-unpruned|cnn|cnn-gpu SEED=n TRIALS=n TIMEOUT=s WORKERS=k STORAGE=url
	@$(PY) -m pipeline tune $(if $(STUDY),--study $(STUDY)) $(if $(SEED),--seed $(SEED)) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(ARGS)

baseline: data ## the study's default trained for the study's time, for make compare (STUDY=cnn SEED=n)
	@$(PY) -m pipeline baseline $(if $(STUDY),--study $(STUDY)) $(if $(SEED),--seed $(SEED)) $(ARGS)

evaluate-best: data ## the champion on the test set: terminal report, reports/<model>-v<N>/report.html, MLflow run
	$(PY) -m pipeline evaluate-best --prune-sweep $(ARGS)

compare: $(INSTALLED) ## studies side by side: table, reports/compare.html, MLflow run (STUDIES="mlp cnn", STORAGE=url)
	@$(PY) -m pipeline compare $(STUDIES) $(ARGS)

dashboard: $(INSTALLED) ## optuna-dashboard for every study, on 127.0.0.1 (DASHBOARD_PORT=n, STORAGE=url)
	@$(PY) -m pipeline dashboard $(if $(DASHBOARD_PORT),--port $(DASHBOARD_PORT)) $(ARGS)

ui: $(INSTALLED) ## the MLflow UI on the tracking store, on 127.0.0.1 (UI_PORT=n)
	@$(PY) -m pipeline ui $(if $(UI_PORT),--port $(UI_PORT)) $(ARGS)

serve: $(INSTALLED) ## the champion behind MLflow's scoring server, on 127.0.0.1 (SERVE_PORT=n)
	@$(PY) -m pipeline serve $(if $(SERVE_PORT),--port $(SERVE_PORT)) $(ARGS)

services: $(INSTALLED) ## PostgreSQL + MLflow tracking server on 127.0.0.1, or HOST=<address> for other machines; prints the exports (PG_PORT, MLFLOW_PORT)
	@$(PY) -m pipeline services start $(if $(filter command line,$(origin HOST)),--host $(HOST)) \
		$(if $(PG_PORT),--pg-port $(PG_PORT)) \
		$(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT))

services-stop: $(INSTALLED) ## stop what make services started
	@$(PY) -m pipeline services stop

services-status: $(INSTALLED) ## say whether the services run, and where
	@$(PY) -m pipeline services status

test: data ## run the test suite (includes the real-data and slow tests)
	$(PY) -m pytest $(ARGS)

test-fast: data ## the quick tier: no slow or real-data tests, one test process a core (about 90 s on 2 cores)
	$(PY) -m pytest -m 'not slow and not real_data' -n auto $(ARGS)

smoke: data ## the whole chain, shrunk, in throwaway stores: train, tune + final phase, registry, evaluate-best
	@scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	export MLFLOW_TRACKING_URI="sqlite:///$$scratch/mlflow.db" CHECKPOINT_DIR="$$scratch/checkpoints" && \
	echo "== train: 1 epoch on 2,000 images" && \
	$(PY) -m pipeline train --epochs 1 --set train_subset=2000 && \
	echo "== tune: the mlp study, 1 trial of 1 epoch on 2,000 images, then its final phase (that trial retrained, up to 60 epochs)" && \
	$(PY) -m pipeline tune --study mlp --trials 1 --storage "sqlite:///$$scratch/optuna.db" \
		--set epochs=1 --set train_subset=2000 && \
	echo "== evaluate-best: the champion it promoted, on the test set" && \
	$(PY) -m pipeline evaluate-best --reports-dir "$$scratch/reports" && \
	echo "== smoke: every stage ran"

bench: data ## trainer vs the notebook's loop and script, time to 90.30 % test, the CNN's epoch and the fast-cnn recipe, MLflow's cost
	$(PY) benchmarks/bench_train.py $(ARGS)
	$(PY) benchmarks/bench_tracking.py

bench-storage: data ## workers per store: Optuna (SQLite, journal, PostgreSQL) and MLflow (SQLite, server) under load, a worker's memory
	$(PY) benchmarks/bench_storage.py --memory $(ARGS)

bench-tracking-scale: data ## RUNS synthetic trial runs (default 10000) in throwaway services: the MLflow UI, search_runs, promotion, evaluate-best, compare, a session's start
	$(PY) benchmarks/bench_tracking_scale.py --runs $(or $(RUNS),10000)

bench-evaluate: data ## what make evaluate-best costs on a fast-cnn-shaped champion with six-view averaging, with and without the pruning sweep
	$(PY) benchmarks/bench_evaluate.py $(ARGS)

clean: ## remove the virtualenv, data/ and reports/ (keeps studies and mlruns)
	rm -rf $(VENV) data reports
