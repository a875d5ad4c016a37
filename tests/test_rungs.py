"""How far pruning could be trusted: rank correlations at the rungs, trials reaching the last rung, and
the best trial against the default configuration, worked out by hand on trials written by hand."""

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from pipeline import attrs
from pipeline.search.study import requeue_interrupted
from pipeline.search.summary import against_default, default_trial, format_summary, rank_correlation, rung_report


def trial(number, state, curve, *, value=None, **user_attrs):
    return FrozenTrial(
        number=number, trial_id=number, state=state, value=value, values=None, datetime_start=None,
        datetime_complete=None, params={"lr": 0.001}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
        user_attrs=user_attrs, system_attrs={}, intermediate_values=dict(enumerate(curve, 1)))


@pytest.mark.parametrize("xs, ys, expected", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4], [1, 3, 2, 4], 0.8),  # 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15)
    ([0.5, 0.5, 0.9], [1, 2, 3], 0.8660254037844387),  # tied values share the rank 1.5
    ([1, 2], [1, 2], None),  # too few to say
    ([1, 1, 1], [1, 2, 3], None),  # one side does not vary
])
def test_rank_correlation_is_spearmans(xs, ys, expected):
    assert rank_correlation(xs, ys) == (None if expected is None else pytest.approx(expected))


def test_the_rung_report_ranks_the_trials_that_ran_to_the_end_and_counts_those_reaching_the_last_rung():
    complete = TrialState.COMPLETE
    trials = [
        # Ran to the end (5 epochs): ranked 3, 1, 2 at epoch 1, 2, 3, 1 at epoch 3 and at the end, so
        # rho = 1 - 6 * (1 + 4 + 1) / (3 * 8) = -0.5 at epoch 1 and 1 at epoch 3.
        trial(0, complete, [0.7, 0.8, 0.85, 0.86, 0.87], value=0.87),
        trial(1, complete, [0.5, 0.6, 0.90, 0.80, 0.80], value=0.90),
        trial(2, complete, [0.6, 0.7, 0.80, 0.84, 0.85], value=0.85),
        trial(3, TrialState.PRUNED, [0.4, 0.5, 0.6]),  # reached the last rung (3), pruned there
        trial(4, TrialState.PRUNED, [0.3]),
        trial(5, TrialState.FAIL, [0.2]),  # not a searched trial that counts
        trial(6, complete, [0.1, 0.2, 0.3, 0.4, 0.99], value=0.99, **{attrs.FINAL_OF: 1}),  # a final run: left out
    ]
    report = rung_report(trials, [1, 3])
    # From epoch 1 to epoch 3, over the four trials that reached epoch 3 (0.7, 0.5, 0.6, 0.4 against 0.85,
    # 0.90, 0.80, 0.6: ranks 4, 2, 3, 1 against 3, 4, 2, 1): 1 - 6 * (1 + 4 + 1 + 0) / (4 * 15) = 0.4.
    assert report["rungs"] == [
        {"epoch": 1, "trials": 3, "rank_correlation": pytest.approx(-0.5),
         "next_epoch": 3, "next_trials": 4, "next_rank_correlation": pytest.approx(0.4)},
        {"epoch": 3, "trials": 3, "rank_correlation": pytest.approx(1.0)}]
    assert report["searched"] == 5 and report["reached_last_rung"] == 4


def test_the_summary_says_how_far_pruning_could_be_trusted_and_what_the_search_gained_over_the_default():
    summary = {"study": "mlp", "trials": 6, "states": {"COMPLETE": 3, "PRUNED": 3}, "epochs_run": 20,
               "epochs_unpruned": 30, "epochs_below_median": 5, "session_seconds": 100.0,
               "best_trial": {"number": 4, "val_accuracy": 0.9140, "params": {}, "best_epoch": 20, "final_of": None},
               "pruning": {"rungs": [{"epoch": 3, "trials": 3, "rank_correlation": 0.5, "next_epoch": 9,
                                      "next_trials": 5, "next_rank_correlation": 0.7},
                                     {"epoch": 9, "trials": 2, "rank_correlation": None}],
                           "searched": 6, "reached_last_rung": 2},
               "against_default": {"default_number": 0, "default_val_accuracy": 0.9125,
                                   "best_searched_number": 4, "best_searched_val_accuracy": 0.9140}}
    text = format_summary(summary)
    assert ("rank correlation with the final value, over the trials that ran to the end: 0.50 at epoch 3 "
            "(3 trials), - at epoch 9 (2 trials)\n  and with the next rung, over every trial that reached it: 0.70 "
            "from epoch 3 to 9 (5 trials)\n  2 of 6 searched trials (33%) reached the last rung (epoch 9)") in text
    assert ("Best searched trial against the default configuration (trial 0, 91.25%): +0.15 points (final phase "
            "left out)") in text
    summary["against_default"]["best_searched_number"] = 0
    assert "still the best searched trial: the search has not beaten it" in format_summary(summary)


def test_the_default_trial_is_the_one_marked_so_and_only_once_it_completed():
    marked = {attrs.DEFAULT_CONFIGURATION: True}
    trials = [trial(0, TrialState.PRUNED, [0.5], **marked), trial(1, TrialState.COMPLETE, [0.8], value=0.8),
              trial(2, TrialState.COMPLETE, [0.7], value=0.7, **marked)]
    assert default_trial(trials).number == 2
    assert default_trial(trials[:2]) is None


def test_the_default_retrained_longer_by_the_final_phase_is_not_the_search_beating_it():
    marked = {attrs.DEFAULT_CONFIGURATION: True}
    trials = [trial(0, TrialState.COMPLETE, [0.90], value=0.90, **marked),
              trial(1, TrialState.COMPLETE, [0.89], value=0.89),
              trial(2, TrialState.COMPLETE, [0.95], value=0.95, **{attrs.FINAL_OF: 0})]
    assert against_default(trials) == {"default_number": 0, "default_val_accuracy": 0.90,
                                       "best_searched_number": 0, "best_searched_val_accuracy": 0.90}
    trials.append(trial(3, TrialState.COMPLETE, [0.91], value=0.91))
    assert against_default(trials)["best_searched_number"] == 3


def test_a_retried_default_is_still_the_default():
    # A Ctrl-C ends the default's trial; its retry carries the mark, so the summary still has a default.
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"lr": 0.001}, user_attrs={attrs.DEFAULT_CONFIGURATION: True})
    interrupted = study.ask()
    interrupted.suggest_float("lr", 1e-4, 1e-2, log=True)
    interrupted.set_user_attr(attrs.INTERRUPTED, True)
    study.tell(interrupted, state=TrialState.FAIL)
    requeue_interrupted(study)
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {attrs.RETRY_OF: 0, attrs.DEFAULT_CONFIGURATION: True}
