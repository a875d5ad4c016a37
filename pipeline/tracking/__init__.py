"""MLflow: a parent run per session and a nested run per trial (runs.py), runs a killed session left
(session_runs.py), the experiment and batched logging (experiments.py), the registry (registry.py),
the model clients load (export.py) and the figures runs hold (figures.py, study_figures.py)."""
