"""Ctrl-C while Optuna creates or tells a trial: held until the trial can end cleanly."""

import os
import signal

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search.interrupts import InterruptGate


class InterruptingSampler(optuna.samplers.RandomSampler):
    """Sends Ctrl-C to this process while `study.ask()` is making the given trial: it exists, RUNNING,
    with no parameters yet."""

    def __init__(self, at_trial: int):
        super().__init__(seed=0)
        self.at_trial = at_trial

    def before_trial(self, study, trial):
        if trial.number == self.at_trial:
            os.kill(os.getpid(), signal.SIGINT)


def objective(trial):
    return trial.suggest_float("x", 0, 1)


def test_with_the_gate_ctrl_c_in_ask_fails_that_trial_and_stops_the_study():
    study = optuna.create_study(sampler=InterruptingSampler(at_trial=1))
    gate = InterruptGate()
    with pytest.raises(KeyboardInterrupt), gate.holding():
        study.optimize(gate.objective(objective), n_trials=3, callbacks=[gate.after_trial])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[1].params == {}  # nothing was sampled, so there is nothing to re-run


def test_ctrl_c_in_a_callback_ends_the_study_after_the_trial_is_told():
    study = optuna.create_study()
    gate = InterruptGate()

    held = []

    def interrupt(study, trial):
        os.kill(os.getpid(), signal.SIGINT)
        held.append(gate.pending)  # reached only if the interrupt was held, not raised inside Optuna

    with pytest.raises(KeyboardInterrupt), gate.holding():
        study.optimize(gate.objective(objective), n_trials=3, callbacks=[interrupt, gate.after_trial])
    assert held == [True]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_ctrl_c_during_training_interrupts_at_once_and_the_handler_is_restored():
    study = optuna.create_study()
    gate = InterruptGate()

    def training(trial):
        trial.suggest_float("x", 0, 1)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("not interrupted")

    with pytest.raises(KeyboardInterrupt), gate.holding():
        study.optimize(gate.objective(training), n_trials=3, callbacks=[gate.after_trial])
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_deferred_write_waits_for_the_write_to_end():
    study = optuna.create_study()
    gate = InterruptGate()
    writes = []

    def training(trial):
        with gate.deferred():  # a trial's write to a store, as the objective does with MLflow and report()
            os.kill(os.getpid(), signal.SIGINT)
            writes.append("finished")  # reached only because the interrupt was held
        raise AssertionError("not interrupted after the write")

    with pytest.raises(KeyboardInterrupt), gate.holding():
        study.optimize(gate.objective(training), n_trials=3, callbacks=[gate.after_trial])
    assert writes == ["finished"]
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_ctrl_c_while_a_finished_trial_logs_lets_it_be_told_complete():
    study = optuna.create_study()
    gate = InterruptGate()

    def trained(trial):
        x = trial.suggest_float("x", 0, 1)
        with gate.deferred(raise_after=False):  # logging the model of a trial that has finished training
            os.kill(os.getpid(), signal.SIGINT)
        return x

    with pytest.raises(KeyboardInterrupt), gate.holding():
        study.optimize(gate.objective(trained), n_trials=3, callbacks=[gate.after_trial])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
