"""The names of what trials and studies record as Optuna user attributes, defined once.

The dashboard shows them, MLflow runs point back at them, `make compare` and the final phase read
them; every module and test uses these names, never the strings.
"""

# Written by every trial (objective.py).
MAX_EPOCHS = "max_epochs"  # epochs it runs unless pruned
EPOCHS_RUN = "epochs_run"  # epochs it ran (pruned trials: fewer)
BEST_EPOCH = "best_epoch"  # the epoch whose validation accuracy is the trial's value
SECONDS = "seconds"  # wall time of the trial, MLflow included
EPOCH_SECONDS = "epoch_seconds"  # its pace, which a final phase plans with
WORKER = "worker"  # host:pid of the worker that ran it
SESSION_SEED = "session_seed"  # the seed of the session that sampled it (`tune --session-seed` replays it)
WORKER_SAMPLER_SEED = "worker_sampler_seed"  # its worker's sampler seed, from the study's, the session's and the worker
RESUMED_FROM = "resumed_from"  # "trial-<n>, epoch <k>": the checkpoint it started from
FAIL_REASON = "fail_reason"  # why it failed (diverged, out of memory)
INTERRUPTED = "interrupted"  # Ctrl-C ended it; the next session runs its parameters again

# Written by the tracker (tracking/runs.py) with tracking on.
MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's MLflow run
TRACKING_SECONDS = "tracking_seconds"  # of SECONDS, spent inside MLflow calls
MODEL_URI = "model_uri"  # its logged model, when it improved on the study's best

# Written when a trial is queued (study.py, workers.py, session.py).
RETRY_OF = "retry_of"  # the trial whose parameters it runs again (Ctrl-C, a lost storage)
FINAL_OF = "final_of"  # a final-phase run: the trial whose configuration it retrains
FINAL_EPOCHS = "final_epochs"  # ... for this many epochs
QUEUED_AT = "queued_at"  # a final-phase run: when it was queued (Unix seconds); one left waiting was abandoned
DEFAULT_CONFIGURATION = "default_configuration"  # the study's default (its recipe's or first [[enqueue]])

# Study attributes (study.py), shown by the dashboard and read by `make compare`.
STUDY_DESCRIPTION = "description"
STUDY_MODEL_FAMILY = "model_family"
STUDY_SAMPLER = "sampler"
STUDY_PRUNER = "pruner"
STUDY_FILE = "study_file"
STUDY_SEED = "sampler_seed"  # `make tune SEED=n`: studies of one file and kind differ only by it
STUDY_KIND = "kind"  # "search", or "baseline" (`make baseline`: the default configuration trained once)
STUDY_RUNGS = "pruning_rungs"  # the epochs at which the pruner compares trials (rank correlations use them)
STUDY_RULES = "rules"  # what makes its trials comparable (fixed settings, space, pruner, objective): resumes must match
STUDY_UID = "study_uid"  # made once, when the study is created: its checkpoints' folder is named by it
BASELINE_OF = "baseline_of"  # a baseline study: the study whose default and time it matches


def retry_attrs(trial) -> dict:
    """The user attributes of a queued retry of ``trial``: which trial it retries, and the default
    configuration's mark, so that a retried default is still the one results are measured against."""
    marked = {DEFAULT_CONFIGURATION: True} if trial.user_attrs.get(DEFAULT_CONFIGURATION) else {}
    return {RETRY_OF: trial.number, **marked}


def is_final_run(trial) -> bool:
    """Whether ``trial`` (running or frozen) is a final-phase run: a trial's configuration retrained longer."""
    return FINAL_OF in trial.user_attrs
