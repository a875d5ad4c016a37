"""Where the project's folders are. Everything that is written by default lives under the repo."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"  # the dataset, when `make data` cannot install Debian's package
STUDIES_DIR = REPO_ROOT / "studies"  # study files, and the local Optuna storage
RECIPES_DIR = REPO_ROOT / "recipes"  # named training configurations: `train --recipe <name>`
MLRUNS_DIR = REPO_ROOT / "mlruns"  # the local MLflow store: its database and artifacts
REPORTS_DIR = REPO_ROOT / "reports"  # evaluate-best's HTML reports
