"""`make baseline`: the study's default configuration trained once for the study's time, as a one-trial
study beside it, never promoted; and `make tune SEED=n` as a study of its own. On the synthetic dataset."""

import json

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.__main__ import main
from pipeline.tracking.registry import REGISTERED_MODEL
from pipeline import attrs
from pipeline.search.study_file import load_study
from tests.shrunk import settings, storage_in


def sets(epochs=3):
    return [arg for key, value in settings(epochs) for arg in ("--set", f"{key}={value}")]


def tune(folder, *extra, trials=3):
    return main(["tune", "--study", "mlp", "--storage", storage_in(folder), "--device", "cpu", "--no-final",
                 "--trials", str(trials), *sets(), *extra])


def baseline(folder, *extra):
    return main(["baseline", "--study", "mlp", "--storage", storage_in(folder), "--device", "cpu", "--json",
                 *sets(), *extra])


@pytest.mark.slow
def test_the_baseline_trains_the_default_for_the_studys_time_and_is_never_promoted(tmp_path, synthetic_env, capsys):
    assert tune(tmp_path) == 0
    study = optuna.load_study(study_name="mlp", storage=storage_in(tmp_path))
    default = next(t for t in study.trials if t.user_attrs.get(attrs.DEFAULT_CONFIGURATION))
    assert default.number == 0 and default.params == load_study("mlp").enqueue[0]
    versions = len(mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_MODEL}'"))
    capsys.readouterr()

    # Five epochs' worth of the default's own pace: five epochs.
    pace = default.user_attrs[attrs.EPOCH_SECONDS]
    assert baseline(tmp_path, "--seconds", str(pace * 5.5)) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert "trained for 5 epochs" in out and summary["study"] == "mlp-baseline"
    (trial,) = optuna.load_study(study_name="mlp-baseline", storage=storage_in(tmp_path)).trials
    assert trial.state == TrialState.COMPLETE and trial.params == default.params
    assert trial.user_attrs[attrs.EPOCHS_RUN] == 5 and trial.user_attrs[attrs.DEFAULT_CONFIGURATION]
    baseline_study = optuna.load_study(study_name="mlp-baseline", storage=storage_in(tmp_path))
    assert baseline_study.user_attrs[attrs.STUDY_KIND] == "baseline"
    assert baseline_study.user_attrs[attrs.BASELINE_OF] == "mlp"
    # A control, not a candidate: no model version came from it.
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_MODEL}'")) == versions
    assert "Registry" not in out

    # By default the study's busy time, capped as its final phase is (max_epochs 60); run again, it is one
    # more trial of the same baseline study.
    assert baseline(tmp_path, "--max-epochs", "2") == 0
    assert "2 epochs (capped" in capsys.readouterr().out
    trials = optuna.load_study(study_name="mlp-baseline", storage=storage_in(tmp_path)).trials
    assert [t.user_attrs[attrs.EPOCHS_RUN] for t in trials] == [5, 2]


@pytest.mark.slow
def test_a_seed_is_a_study_of_its_own_recorded_on_it(tmp_path, synthetic_env, capsys):
    assert tune(tmp_path, "--seed", "1", trials=4) == 0
    assert tune(tmp_path, trials=4) == 0
    storage = storage_in(tmp_path)
    seeded, plain = (optuna.load_study(study_name=name, storage=storage) for name in ("mlp-seed1", "mlp"))
    assert seeded.user_attrs[attrs.STUDY_SEED] == 1 and plain.user_attrs[attrs.STUDY_SEED] == 0
    # Both start from the same default and then sample differently.
    assert seeded.trials[0].params == plain.trials[0].params
    assert [t.params for t in seeded.trials[1:]] != [t.params for t in plain.trials[1:]]
    # The baseline of a seed is that seed's.
    capsys.readouterr()
    assert baseline(tmp_path, "--seed", "1", "--max-epochs", "1", "--no-tracking") == 0
    assert "mlp-seed1-baseline" in capsys.readouterr().out


def test_a_baseline_before_its_study_ran_is_one_line_naming_the_fix(tmp_path, synthetic_env, capsys):
    optuna.create_study(study_name="other", storage=storage_in(tmp_path))
    assert baseline(tmp_path, "--no-tracking") == 1
    error = capsys.readouterr().err
    assert "no study 'mlp' in the storage yet" in error and "make tune STUDY=mlp" in error


def test_a_study_without_a_default_configuration_cannot_have_a_baseline(tmp_path, synthetic_env, capsys):
    text = (load_study("mlp").path.read_text().split("[[enqueue]]")[0])
    (tmp_path / "nodefault.toml").write_text(text)
    optuna.create_study(study_name="nodefault", storage=storage_in(tmp_path))
    assert main(["baseline", "--study", str(tmp_path / "nodefault.toml"), "--storage", storage_in(tmp_path),
                 "--no-tracking"]) == 1
    assert "has none. Fix: add a `recipe" in capsys.readouterr().err
