"""MLflow tracking and the registry, on a temporary SQLite store (see conftest) and the synthetic dataset."""

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search import Session, format_summary, run_session
from pipeline.tracking import CHALLENGER, CHAMPION, REGISTERED_MODEL
from tests.tiny_study import storage_in, write_study

BAD_SECOND_STUDY = """
[[enqueue]]
lr = 1e-7
optimizer = "adam"
"""


def tune(folder, study_file, trials, **kwargs):
    return run_session(Session(str(study_file), storage_in(folder), trials=trials, timeout=None, device="cpu",
                               **kwargs))


@pytest.fixture
def tracked_study(tmp_path, synthetic_env):
    """The tiny study (a good trial, a hopeless one, a diverging one, then TPE) with tracking on."""
    study_file = write_study(tmp_path, trials=4, lr_high=1e7)
    summary = tune(tmp_path, study_file, trials=4)
    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    return summary, study


def runs_by_trial(client, study_name):
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id])
    return {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}, runs


def test_every_trial_is_one_nested_run_with_the_status_optuna_gave_it(tracked_study):
    summary, study = tracked_study
    client = mlflow.MlflowClient()
    trial_runs, all_runs = runs_by_trial(client, "tiny")
    parents = [r for r in all_runs if r.data.tags.get("kind") == "tuning-session"]
    assert len(parents) == 1 and summary["mlflow_parent_run_id"] == parents[0].info.run_id

    expected_status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    assert len(trial_runs) == len(study.trials)
    for trial in study.trials:
        run = trial_runs[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # the link goes both ways
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["study"] == "tiny" and run.data.tags["sampler"] == "tpe"
        assert run.info.status == expected_status[trial.state]
        for tag in ("git_commit", "dataset_checksum", "device", "version.torch", "version.optuna"):
            assert run.data.tags[tag]
        assert run.data.params["lr"] == str(trial.params["lr"])  # the full config ...
        assert run.data.params["sampled.lr"] == str(trial.params["lr"])  # ... and what was sampled
        assert run.data.params["hidden_sizes"] == "[32]"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, trial.user_attrs["epochs_run"] + 1))

    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert pruned and failed
    assert trial_runs[pruned[0].number].data.tags["pruned_at_epoch"] == str(pruned[0].user_attrs["epochs_run"])
    assert "lower the learning rate" in trial_runs[failed[0].number].data.tags["fail_reason"]


def test_the_session_run_carries_optunas_figures_and_the_summary(tracked_study):
    summary, _ = tracked_study
    client = mlflow.MlflowClient()
    run_id = summary["mlflow_parent_run_id"]
    figures = {a.path for a in client.list_artifacts(run_id, "optuna")}
    for name in ("optimization_history", "intermediate_values"):  # the others need more complete trials
        assert {f"optuna/{name}.html", f"optuna/{name}.png"} <= figures  # interactive, and offline-proof
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")
    assert logged["best_trial"]["number"] == summary["best_trial"]["number"]
    assert client.get_run(run_id).data.metrics["best_val_accuracy"] == summary["best_trial"]["val_accuracy"]


def test_the_summary_says_what_tracking_cost(tracked_study):
    summary, study = tracked_study
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert all(0 < t.user_attrs["tracking_seconds"] < t.user_attrs["seconds"] for t in finished)
    assert summary["trial_tracking_seconds"] == pytest.approx(
        sum(t.user_attrs["tracking_seconds"] for t in finished), abs=0.1)
    assert summary["session_tracking_seconds"] > 0
    assert "MLflow tracking: " in format_summary(summary)


def test_completed_trials_carry_confusion_matrix_per_class_metrics_and_curves(tracked_study):
    _, study = tracked_study
    client = mlflow.MlflowClient()
    trial_runs, _ = runs_by_trial(client, "tiny")
    best = study.best_trial
    run_id = trial_runs[best.number].info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"confusion_matrix.html", "confusion_matrix.png", "confusion_matrix.json", "per_class_metrics.json",
            "learning_curves.html"} <= names
    png = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/confusion_matrix.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"  # the image the UI previews, offline too
    counts = mlflow.artifacts.load_dict(f"runs:/{run_id}/confusion_matrix.json")["counts"]
    assert np.asarray(counts).sum() == 200  # the validation split
    assert np.trace(np.asarray(counts)) / 200 == pytest.approx(best.value)
    assert client.get_run(run_id).data.metrics["best_val_accuracy"] == pytest.approx(best.value)


def test_the_best_model_becomes_champion_and_predicts_on_raw_pixels(tracked_study, synthetic_dataset):
    summary, study = tracked_study
    assert summary["promotion"]["outcome"] == "promoted to champion"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert version.tags["trial"] == str(study.best_trial.number) and version.tags["study"] == "tiny"
    assert float(version.tags["val_accuracy"]) == pytest.approx(study.best_value)

    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    raw = synthetic_dataset.test_images.numpy().astype(np.float32)  # 0-255, (N, 28, 28)
    scores = np.asarray(model.predict(raw))
    assert scores.shape == (len(raw), 10)
    accuracy = (scores.argmax(axis=1) == synthetic_dataset.test_labels.numpy()).mean()
    assert accuracy > 0.9


def test_a_worse_study_does_not_move_the_champion(tracked_study, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    study_file = write_study(second, trials=1, epochs=1, enqueue=BAD_SECOND_STUDY)
    study_file = study_file.rename(second / "tiny-worse.toml")
    summary = tune(second, study_file, trials=1)
    assert summary["promotion"]["outcome"].startswith("challenger")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    challenger = client.get_model_version_by_alias(REGISTERED_MODEL, CHALLENGER)
    assert champion.tags["study"] == "tiny" and challenger.tags["study"] == "tiny-worse"


def test_tuning_works_with_tracking_off(tmp_path, synthetic_env):
    summary = tune(tmp_path, write_study(tmp_path, trials=3), trials=3, tracking=False)
    assert summary["states"].get("COMPLETE", 0) + summary["states"].get("PRUNED", 0) == 3
    assert "promotion" not in summary and "trial_tracking_seconds" not in summary
    assert not (tmp_path / "mlflow.db").exists()
