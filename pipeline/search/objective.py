"""One trial: sample a configuration, train it with the shared trainer, report each epoch's
validation accuracy to Optuna and prune on request, record what happened.

Pruning lives in the trainer's ``on_epoch_end`` callback: report the epoch's validation accuracy,
ask the pruner, raise ``optuna.TrialPruned``. The trainer stays Optuna-free.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback

from pipeline.training.checkpoints import NoCheckpoint, TrialCheckpoint
from pipeline.data.dataset import FashionMNIST, Splits, data_seen, make_splits
from pipeline.errors import first_line
from pipeline.progress import NoBar
from pipeline import attrs
from pipeline.search.study_file import StudySpec
from pipeline.tracking.runs import NullTrialTrackers
from pipeline.training.train import EpochMetrics, NonFiniteLossError, train

# Errors that end one trial as FAIL, with the reason, while the study goes on.
TRIAL_ERRORS = (NonFiniteLossError, torch.OutOfMemoryError, MemoryError)
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


def _no_deferral(raise_after: bool = True):
    return nullcontext()


class Objective:
    """Train one sampled configuration; report each epoch's validation accuracy; prune on request.

    The dataset is loaded once per worker process and the splits made once per distinct
    (val_size, train_subset), not per trial. ``trial_trackers()`` gives each trial its tracker: an
    MLflow run, or a tracker that does nothing. ``deferred`` (an InterruptGate's) holds a Ctrl-C
    while the trial writes to the stores.
    """

    def __init__(self, spec: StudySpec, dataset: FashionMNIST, device, trial_trackers=None,
                 deferred=_no_deferral, new_bar=None, checkpoints: bool = False, seeds: dict | None = None):
        self.spec = spec
        self.dataset = dataset
        self.device = device
        self.trial_trackers = trial_trackers or NullTrialTrackers()
        self.deferred = deferred
        self.new_bar = new_bar or (lambda trial_number, epochs: NoBar())  # (trial number, epochs) -> a bar
        self.checkpoints = checkpoints  # per-epoch checkpoints, so a retried trial resumes (checkpoints.py)
        self.seeds = seeds or {}  # the session's and the sampler's seeds, recorded on each trial
        self.run_tags = {"device": str(device), "dataset": dataset.kind, "dataset_checksum": dataset.checksum}
        self._splits: dict[tuple[int, int], Splits] = {}
        self._seen: dict[tuple[int, int], list] = {}  # what a trial on those splits sees, for its run's lineage
        self.current_trial: int | None = None  # the number of the trial running, or last run

    def splits_for(self, val_size: int, train_subset: int) -> Splits:
        key = (val_size, train_subset)
        if key not in self._splits:
            self._splits[key] = make_splits(self.dataset, val_size=val_size, train_subset=train_subset).to(self.device)
            self._seen[key] = data_seen(self.dataset, self._splits[key], val_size=val_size, train_subset=train_subset)
        return self._splits[key]

    def __call__(self, trial: optuna.Trial) -> float:
        """The trial's value. However it ends, its MLflow run ends with it (never left RUNNING), and a
        Ctrl-C at any point of it marks it for the next session to run again."""
        self.current_trial = trial.number
        tracker = self.trial_trackers()
        try:
            return self._run(trial, tracker)
        except KeyboardInterrupt:
            with self.deferred(raise_after=False):  # a second Ctrl-C must not stop the bookkeeping
                trial.set_user_attr(attrs.INTERRUPTED, True)  # the next session runs these parameters again
                _end_run(tracker, "interrupted (Ctrl-C)")
            raise
        except (*TRIAL_ERRORS, optuna.TrialPruned):
            raise  # recorded where they were raised
        except Exception as error:  # kept: a trial that lost its storage is retried (see workers.py)
            with self.deferred():
                _end_run(tracker, repr(error))
            raise

    def _run(self, trial: optuna.Trial, tracker) -> float:
        config = self.spec.config_for(trial)
        splits = self.splits_for(config.val_size, config.train_subset)
        started = time.perf_counter()
        checkpoint = self.checkpoint_for(trial, config)
        resumed = checkpoint.load()
        epochs_run = resumed_epochs = resumed["epoch"] if resumed else 0
        with self.deferred():
            trial.set_user_attr(attrs.MAX_EPOCHS, config.epochs)  # what it runs unless pruned (--set may change it)
            trial.set_user_attr(attrs.WORKER, WORKER_NAME)  # which machine and process: sessions may share a study
            _set_user_attrs(trial, self.seeds)
            # The validation split's digest: promotion compares only models validated on the same images.
            split_tag = {"validation_split": splits.val_digest or "unrecorded"}
            tracker.start(trial.number, config, trial.params, {**self.run_tags, **split_tag}, dataset=self.dataset,
                          seen=self._seen[(config.val_size, config.train_subset)])
            _set_user_attrs(trial, tracker.trial_attributes())  # the run's id: the link goes both ways
            if resumed:
                # The epochs an earlier run of these parameters finished: the pruner and the run see them too.
                trial.set_user_attr(attrs.RESUMED_FROM, f"{checkpoint.resumed_from.stem}, epoch {resumed['epoch']}")
                for metrics in map(lambda m: EpochMetrics(**m), resumed["history"]):
                    tracker.log_epoch(metrics)
                    trial.report(metrics.val_accuracy, metrics.epoch)

        def on_epoch_end(epoch, metrics):
            nonlocal epochs_run
            epochs_run = epoch
            bar.update(epoch, metrics.val_accuracy)
            with self.deferred():
                tracker.log_epoch(metrics)
                trial.report(metrics.val_accuracy, epoch)
            self._prune_if_asked(trial, tracker, epoch, f"after epoch {epoch} at val_accuracy "
                                                        f"{metrics.val_accuracy:.4f}")

        bar = self.new_bar(trial.number, config.epochs)  # closed in the finally below
        try:
            if resumed:
                # The run it resumes may have been killed after saving an epoch and before the pruner
                # judged it: judge it now, or a trial that rung would stop goes on.
                self._prune_if_asked(trial, tracker, resumed_epochs, f"at epoch {resumed_epochs}, the epoch it "
                                                                     f"resumed from")
            result = train(config, splits, device=self.device, on_epoch_end=on_epoch_end, resume_from=resumed,
                           on_checkpoint=checkpoint.save)
            # The model is logged only when the trial beats the study's best so far: the best trial
            # always has one, and the cost stays off the trials that cannot be promoted. A Ctrl-C
            # from here on waits for the trial to be told COMPLETE.
            with self.deferred(raise_after=False):
                model_uri = tracker.complete(result, splits,
                                             log_model=_improves_on_best(trial, result.best_val_accuracy))
        except TRIAL_ERRORS as error:
            checkpoint.remove()
            reason = str(error) if isinstance(error, NonFiniteLossError) else _out_of_memory(error, self.device)
            with self.deferred():
                trial.set_user_attr(attrs.FAIL_REASON, reason)
                tracker.failed(reason)
            raise
        except optuna.TrialPruned:
            checkpoint.remove()
            raise
        finally:
            bar.close()  # before the trial's line is printed
            with self.deferred(raise_after=False):
                trial.set_user_attr(attrs.EPOCHS_RUN, epochs_run)
                seconds = time.perf_counter() - started
                trial.set_user_attr(attrs.SECONDS, round(seconds, 2))
                if epochs_run > resumed_epochs:  # this run's pace, MLflow included: what a final phase plans with
                    trial.set_user_attr(attrs.EPOCH_SECONDS, round(seconds / (epochs_run - resumed_epochs), 3))
                _set_user_attrs(trial, tracker.trial_attributes())  # with its seconds inside MLflow calls
        with self.deferred(raise_after=False):
            trial.set_user_attr(attrs.BEST_EPOCH, result.best_epoch)
            if model_uri:
                trial.set_user_attr(attrs.MODEL_URI, model_uri)
        checkpoint.remove()
        return result.best_val_accuracy

    def _prune_if_asked(self, trial: optuna.Trial, tracker, epoch: int, when: str) -> None:
        """Ask the pruner about the last reported epoch; when it says stop, mark the run and raise
        TrialPruned. A final-phase trial's stretched schedule is behind shorter trials mid-way, by design:
        it is never pruned."""
        with self.deferred():
            prune = not attrs.is_final_run(trial) and trial.should_prune()
            if prune:
                tracker.pruned(epoch)
        if prune:
            raise optuna.TrialPruned(f"pruned {when}")

    def checkpoint_for(self, trial: optuna.Trial, config):
        if not self.checkpoints:
            return NoCheckpoint()
        identity = {"params": trial.params, "config": config.to_dict(), "device": self.device.type}
        # The study's name and its storage's mark: two storages holding a study of one name keep apart.
        uid = trial.study.user_attrs.get(attrs.STUDY_UID)
        folder = f"{self.spec.name}-{uid}" if uid else self.spec.name
        return TrialCheckpoint.for_trial(folder, trial.number, earlier_runs(trial), identity)


def _end_run(tracker, reason: str) -> None:
    """End the trial's run FAILED with ``reason``; a store that cannot be written to now gets a note, so
    that the error that ended the trial is the one raised."""
    try:
        tracker.failed(reason)
    except Exception as error:
        print(f"note: trial run not marked FAILED ({first_line(error)}); the next session's start ends it",
              flush=True)


def earlier_runs(trial: optuna.Trial) -> list[int]:
    """The trials that ran these parameters before this one, oldest first: Optuna's heartbeat retries
    (system attribute `retry_history`) and our Ctrl-C re-queue (user attribute `retry_of`)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    # A heartbeat retry copies the stale trial's user attributes, so a `retry_of` there is the older one.
    earlier = [frozen.user_attrs[attrs.RETRY_OF]] if attrs.RETRY_OF in frozen.user_attrs else []
    return earlier + RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def _out_of_memory(error: BaseException, device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the next trial the memory this one held
    return f"out of memory ({first_line(error)}); lower batch_size or the layer widths"


def _set_user_attrs(trial: optuna.Trial, attributes: dict) -> None:
    for key, value in attributes.items():
        trial.set_user_attr(key, value)


def _improves_on_best(trial: optuna.Trial, value: float) -> bool:
    try:
        return value > trial.study.best_value
    except ValueError:  # no complete trial yet
        return True
