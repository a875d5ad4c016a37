"""MLflow tracking and the registry, on a temporary SQLite store (see conftest) and the synthetic dataset,
with the shipped studies shrunk (tests/shrunk.py)."""

import dataclasses
import json

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.data.dataset import make_splits
from pipeline.tracking.registry import CHALLENGER, CHAMPION, REGISTERED_MODEL
from pipeline import attrs
from pipeline.search.session import run_session
from pipeline.search.summary import format_summary
from pipeline.stores import StorageError
from tests.shrunk import DIVERGES, HOPELESS, LEARNS, enqueue, session, storage_in, tracker_for


def tune(folder, study="mlp", *, trials, epochs=4):
    tuning = session(folder, study, trials=trials, epochs=epochs)
    return run_session(tuning, tracker_for(tuning))


@pytest.fixture(scope="module")
def _tracked_mlp_study(shared_store):
    """The mlp study, tracked: two trials that learn, a hopeless one (pruned), a diverging one (failed)."""
    use, folder = shared_store
    with pytest.MonkeyPatch.context() as monkeypatch:
        use(monkeypatch)
        enqueue(folder, "mlp", LEARNS, {**LEARNS, "lr": 2e-3}, HOPELESS, DIVERGES)
        summary = tune(folder, trials=4)
    return summary, optuna.load_study(study_name="mlp", storage=storage_in(folder))


@pytest.fixture
def tracked_study(_tracked_mlp_study, shared_store, monkeypatch):
    use, _ = shared_store
    use(monkeypatch)
    return _tracked_mlp_study


def runs_by_trial(client, study_name):
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id])
    return {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}, runs


def test_every_trial_is_one_nested_run_with_the_status_optuna_gave_it(tracked_study):
    summary, study = tracked_study
    client = mlflow.MlflowClient()
    # The UI opens it on runs, metrics and models, not in its GenAI view.
    assert client.get_experiment_by_name("mlp").tags["mlflow.experimentKind"] == "custom_model_development"
    trial_runs, _ = runs_by_trial(client, "mlp")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.tags["kind"] == "tuning-session" and parent.info.status == "FINISHED"
    # The session's seed, on its run and its trials' runs, replays it (`tune --session-seed`).
    assert parent.data.tags["session_seed"] == str(summary["session_seed"])

    expected_status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    assert len(trial_runs) == len(study.trials)
    for trial in study.trials:
        run = trial_runs[trial.number]
        assert trial.user_attrs[attrs.MLFLOW_RUN_ID] == run.info.run_id  # the link goes both ways
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["study"] == "mlp" and run.data.tags["sampler"] == "tpe"
        assert run.data.tags["session_seed"] == str(trial.user_attrs[attrs.SESSION_SEED])
        assert run.data.tags["dataset"] == "custom"  # the synthetic data are not Fashion-MNIST, and say so
        assert run.info.status == expected_status[trial.state]
        for tag in ("git_commit", "dataset_checksum", "device", "version.torch", "version.optuna"):
            assert run.data.tags[tag]
        assert run.data.params["lr"] == str(trial.params["lr"])  # the full config ...
        assert run.data.params["sampled.lr"] == str(trial.params["lr"])  # ... and what was sampled
        assert run.data.params["epochs"] == "4" and run.data.params["val_size"] == "200"  # the shrunk settings
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, trial.user_attrs[attrs.EPOCHS_RUN] + 1))

    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert pruned and failed
    assert trial_runs[pruned[0].number].data.tags["pruned_at_epoch"] == str(pruned[0].user_attrs[attrs.EPOCHS_RUN])
    assert "lower the learning rate" in trial_runs[failed[0].number].data.tags["fail_reason"]


def test_each_trial_run_shows_the_data_it_trained_and_validated_on(tracked_study, synthetic_dataset):
    """The run page's Datasets: training and validation, each with a digest of the images it holds
    (the dataset's checksum and the split's indices): the same for every trial on the same split."""
    _, study = tracked_study
    trial_runs, _ = runs_by_trial(mlflow.MlflowClient(), "mlp")
    seen = set()
    for run in trial_runs.values():
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # context: dataset
        assert sorted(inputs) == ["training", "validation"]
        assert inputs["training"].digest != inputs["validation"].digest
        profile = json.loads(inputs["validation"].profile)
        assert profile["images"] == 200 and profile["dataset_checksum"] == synthetic_dataset.checksum
        assert json.loads(inputs["training"].profile)["images"] == len(synthetic_dataset.train_labels) - 200
        seen.add((inputs["training"].digest, inputs["validation"].digest))
    assert len(seen) == 1  # every trial saw the same images ...
    splits = make_splits(synthetic_dataset, val_size=200)
    assert seen == {(splits.train_digest, splits.val_digest)}  # ... these ones
    other = make_splits(synthetic_dataset, val_size=300)
    assert other.train_digest != splits.train_digest and other.val_digest != splits.val_digest


def test_the_session_run_carries_optunas_figures_and_the_summary(tracked_study):
    summary, _ = tracked_study
    client = mlflow.MlflowClient()
    run_id = summary["mlflow_parent_run_id"]
    figures = {a.path for a in client.list_artifacts(run_id, "optuna")}
    for name in ("optimization_history", "intermediate_values", "param_importances"):
        assert f"optuna/{name}.png" in figures
    page = mlflow.artifacts.load_text(f"runs:/{run_id}/optuna/figures.html")
    assert page.count("Plotly.newPlot") >= 3 and "<script src=" not in page  # interactive, and nothing to fetch
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")
    assert logged["best_trial"]["number"] == summary["best_trial"]["number"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["best_val_accuracy"] == summary["best_trial"]["val_accuracy"]
    assert metrics["epochs_unpruned"] == summary["epochs_unpruned"] > metrics["epochs_run"]


def test_the_summary_says_what_tracking_cost(tracked_study):
    summary, study = tracked_study
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert all(0 < t.user_attrs[attrs.TRACKING_SECONDS] < t.user_attrs[attrs.SECONDS] for t in finished)
    assert summary["session_tracking_seconds"] > 0
    assert "MLflow tracking: " in format_summary(summary)


def test_completed_trials_carry_confusion_matrix_per_class_metrics_and_curves(tracked_study):
    _, study = tracked_study
    client = mlflow.MlflowClient()
    trial_runs, _ = runs_by_trial(client, "mlp")
    best = study.best_trial
    run_id = trial_runs[best.number].info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json", "per_class_metrics.json", "learning_curves.png"} <= names
    assert not [name for name in names if name.endswith(".html")]  # nothing the offline UI would show blank
    png = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/confusion_matrix.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"  # the image the UI previews, offline too
    counts = np.asarray(mlflow.artifacts.load_dict(f"runs:/{run_id}/confusion_matrix.json")["counts"])
    assert counts.sum() == 200 and (counts.sum(axis=1) == 20).all()  # the validation split, 20 a class
    assert np.trace(counts) / 200 == pytest.approx(best.value)
    per_class = mlflow.artifacts.load_dict(f"runs:/{run_id}/per_class_metrics.json")
    assert per_class["Bag"]["recall"] == pytest.approx(counts[8, 8] / 20)
    assert client.get_run(run_id).data.metrics["best_val_accuracy"] == pytest.approx(best.value)


def test_the_best_model_becomes_champion_and_predicts_on_raw_pixels(tracked_study, synthetic_dataset):
    summary, study = tracked_study
    assert summary["promotion"]["outcome"] == "promoted to champion"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert version.tags["trial"] == str(study.best_trial.number) and version.tags["study"] == "mlp"
    assert float(version.tags["val_accuracy"]) == pytest.approx(study.best_value)
    # What it was validated on, so that promotion compares it only with models validated alike.
    from pipeline.data.dataset import make_splits

    assert version.tags["val_size"] == "200"
    assert version.tags["validation_split"] == make_splits(synthetic_dataset, val_size=200).val_digest

    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    raw = synthetic_dataset.test_images.numpy().astype(np.float32)  # 0-255, (N, 28, 28)
    scores = np.asarray(model.predict(raw))
    assert scores.shape == (len(raw), 10)
    accuracy = (scores.argmax(axis=1) == synthetic_dataset.test_labels.numpy()).mean()
    assert accuracy > 0.9


def test_running_the_same_study_again_keeps_its_champion_without_a_new_version(tracked_study, shared_store):
    summary, _ = tracked_study
    versions = lambda: len(mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_MODEL}'"))
    before = versions()
    again = tune(shared_store[1], trials=4)  # the target is met: no new trial, the same best trial
    assert again["promotion"]["outcome"] == "already champion"
    assert again["promotion"]["version"] == summary["promotion"]["version"]
    assert versions() == before


def test_a_worse_study_becomes_challenger_and_the_champion_stays(tracked_study, tmp_path):
    worse = tmp_path / "worse"
    worse.mkdir()
    enqueue(worse, "mlp-random", HOPELESS)
    summary = tune(worse, "mlp-random", trials=1)
    assert summary["promotion"]["outcome"].startswith("challenger")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    challenger = client.get_model_version_by_alias(REGISTERED_MODEL, CHALLENGER)
    assert champion.tags["study"] == "mlp" and challenger.tags["study"] == "mlp-random"


@pytest.mark.slow
def test_a_better_study_takes_the_champion_alias(tmp_path, synthetic_env):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    enqueue(first, "mlp-random", HOPELESS)
    assert tune(first, "mlp-random", trials=1)["promotion"]["outcome"] == "promoted to champion"
    enqueue(second, "mlp", LEARNS)
    summary = tune(second, trials=1)
    assert summary["promotion"]["outcome"] == "promoted to champion"
    champion = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert champion.tags["study"] == "mlp" and int(champion.version) == summary["promotion"]["version"] == 2


def test_tuning_works_with_tracking_off(tmp_path, synthetic_env, absent_mlflow_store):
    summary = run_session(session(tmp_path, trials=3))  # no tracker: the null one
    assert summary["states"].get("COMPLETE", 0) + summary["states"].get("PRUNED", 0) == 3
    assert "promotion" not in summary and "trial_tracking_seconds" not in summary
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_model_trained_on_custom_data_never_displaces_a_champion_trained_on_other_data(tmp_path, synthetic_env):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    enqueue(first, "mlp-random", HOPELESS)
    tune(first, "mlp-random", trials=1)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    # Make it look trained on the official data, as a real champion would be.
    client.set_model_version_tag(REGISTERED_MODEL, champion.version, "dataset", "official")
    client.set_model_version_tag(REGISTERED_MODEL, champion.version, "dataset_checksum", "the-official-one")

    enqueue(second, "mlp", LEARNS)
    summary = tune(second, trials=1)  # far better on its own (synthetic) validation split ...
    assert summary["promotion"]["outcome"] == f"challenger (champion v{champion.version} was trained on official data)"
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version == champion.version  # ... but stays out


def test_a_session_that_fails_ends_its_parent_run_instead_of_leaving_it_running(tmp_path, synthetic_env):
    tuning = dataclasses.replace(session(tmp_path, trials=1), storage=f"sqlite:///{tmp_path}/no/such/folder/optuna.db")
    tracker = tracker_for(tuning)
    with pytest.raises(StorageError, match="no/such/folder does not exist"):
        run_session(tuning, tracker)
    assert mlflow.MlflowClient().get_run(tracker.run_id).info.status == "FAILED"


def test_a_promotion_that_fails_still_ends_the_session_run(tmp_path, synthetic_env, monkeypatch):
    import pipeline.tracking.registry as registry

    def unreadable_registry(study):
        raise registry.RegistryError("cannot read the champion of 'fashion-mnist-classifier': 503")

    monkeypatch.setattr(registry, "promote_best_trial", unreadable_registry)
    tuning = session(tmp_path, trials=1, epochs=1)
    tracker = tracker_for(tuning)
    with pytest.raises(registry.RegistryError, match="503"):
        run_session(tuning, tracker)
    assert mlflow.MlflowClient().get_run(tracker.run_id).info.status == "FAILED"


def test_the_error_that_ended_a_session_is_the_one_shown_when_ending_its_run_fails_too(
        tmp_path, synthetic_env, monkeypatch, capsys):
    import pipeline.tracking.figures
    import pipeline.search.objective as objective

    def broken_trainer(*args, **kwargs):
        raise RuntimeError("the cause: a bug in training")

    def broken_figures(study):
        raise ValueError("a figure that cannot be drawn")

    monkeypatch.setattr(objective, "train", broken_trainer)
    monkeypatch.setattr(pipeline.tracking.figures, "optuna_figures", broken_figures)
    tuning = session(tmp_path, trials=1, epochs=1)
    tracker = tracker_for(tuning)
    with pytest.raises(RuntimeError, match="the cause"):
        run_session(tuning, tracker)
    client = mlflow.MlflowClient()
    assert client.get_run(tracker.run_id).info.status == "FAILED"  # ended although its figures failed
    assert "a figure that cannot be drawn" in capsys.readouterr().out
    # The trial's run ended with it, FAILED with the error, not left RUNNING.
    trial_runs, _ = runs_by_trial(client, "mlp")
    assert trial_runs[0].info.status == "FAILED" and "a bug in training" in trial_runs[0].data.tags["fail_reason"]


def test_a_trial_whose_run_cannot_be_opened_fully_leaves_no_run_running(tmp_path, synthetic_env, monkeypatch):
    def inputs_refused(self, run_id, datasets=None, models=None):
        raise mlflow.exceptions.MlflowException("the tracking server refused the dataset inputs")

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", inputs_refused)  # after the run is created
    tuning = session(tmp_path, trials=1, epochs=1)
    tracker = tracker_for(tuning)
    with pytest.raises(mlflow.exceptions.MlflowException, match="refused the dataset inputs"):
        run_session(tuning, tracker)
    trial_runs, runs = runs_by_trial(mlflow.MlflowClient(), "mlp")
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert trial_runs[0].info.status == "FAILED"


def registered_versions(*tag_sets):
    """Versions of the registered model with these tags, as sessions would register them (no model files:
    promotion reads tags only), in this test's own store."""
    from pipeline.stores import configure_mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name='{REGISTERED_MODEL}'"):
        client.create_registered_model(REGISTERED_MODEL)
    found = client.get_experiment_by_name("promotion")
    experiment = found.experiment_id if found else client.create_experiment("promotion")
    versions = []
    for tags in tag_sets:
        run = client.create_run(experiment)
        versions.append(client.create_model_version(REGISTERED_MODEL, source=f"runs:/{run.info.run_id}/model",
                                                    run_id=run.info.run_id, tags=tags))
    return versions


def promote_two_at_once(monkeypatch, accuracies=(0.90, 0.92), read_delays=(1.0, 0.2)):
    """Two versions promoted from two threads at the same moment, as two sessions finishing together
    would. Each thread's first read of the champion is answered late (the first thread's later), so
    both decide on "no champion" and the worse one writes last. Returns the champion's version and
    the versions in order of ``accuracies``."""
    import threading
    import time

    import pipeline.tracking.registry as registry

    versions = registered_versions(*({"val_accuracy": str(accuracy), "dataset": "custom", "dataset_checksum": "same",
                                      "validation_split": "same"} for accuracy in accuracies))
    client = mlflow.MlflowClient()
    real_read, delays, first_read = registry._champion, {}, set()

    def late_first_read(client, name, **kwargs):
        answer = real_read(client, name, **kwargs)
        me = threading.current_thread().name
        if me not in first_read:
            first_read.add(me)
            time.sleep(delays[me])
        return answer

    monkeypatch.setattr(registry, "_champion", late_first_read)
    start, outcomes = threading.Barrier(len(versions)), {}

    def promote(version, delay):
        delays[threading.current_thread().name] = delay
        start.wait()
        outcomes[version.version] = registry.promote(version)

    threads = [threading.Thread(target=promote, args=(v, d)) for v, d in zip(versions, read_delays)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version, versions, outcomes


def test_two_promotions_at_once_leave_the_champion_on_the_better_version(tmp_path, monkeypatch):
    champion, (worse, better), outcomes = promote_two_at_once(monkeypatch)
    assert champion == better.version  # not the worse one, although it wrote the alias last
    assert outcomes[better.version] == "promoted to champion" and outcomes[worse.version].startswith("challenger")


OFFICIAL = {"dataset": "official", "dataset_checksum": "d1fd84a877f3"}


def test_a_model_validated_on_another_split_is_not_compared_with_the_champion(tmp_path):
    import pipeline.tracking.registry as registry

    standard, small_split = registered_versions(
        {**OFFICIAL, "val_accuracy": "0.90", "val_size": "10000", "validation_split": "split-a"},
        {**OFFICIAL, "val_accuracy": "0.99", "val_size": "1000", "validation_split": "split-b"})  # `--set val_size=1000`
    assert registry.promote(standard) == "promoted to champion"
    # 99 % on 1,000 other images says nothing against 90 % on the standard 10,000: the champion stays.
    assert registry.promote(small_split) == "challenger (champion v1 was validated on another split: val_size 10000, this one 1000)"
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version == standard.version
    # The other way round, the model validated as the shipped studies validate takes the alias.
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, small_split.version)
    assert registry.promote(standard) == "promoted to champion"


def test_a_champion_registered_before_splits_were_recorded_is_still_compared_by_accuracy(tmp_path):
    import pipeline.tracking.registry as registry

    legacy, newer = registered_versions(
        {**OFFICIAL, "val_accuracy": "0.95"},  # no validation_split nor val_size: an older version
        {**OFFICIAL, "val_accuracy": "0.90", "val_size": "10000", "validation_split": "split-a"})
    assert registry.promote(legacy) == "promoted to champion"
    assert registry.promote(newer) == "challenger (champion v1 has 95.00%)"  # an upgrade does not displace it


def test_a_registry_that_cannot_be_read_moves_no_alias(tmp_path, monkeypatch):
    import pipeline.tracking.registry as registry
    from mlflow.exceptions import MlflowException

    same_split = {**OFFICIAL, "val_size": "10000", "validation_split": "split-a"}
    [champion] = registered_versions({**same_split, "val_accuracy": "0.90"})
    assert registry.promote(champion) == "promoted to champion"
    [better] = registered_versions({**same_split, "val_accuracy": "0.97"})  # would take the alias, were it read

    def unavailable(self, name):
        raise MlflowException("503 Service Unavailable: the tracking server is restarting")

    with monkeypatch.context() as patched, pytest.raises(registry.RegistryError,
                                                          match="cannot read the champion .* the alias was not moved"):
        patched.setattr(mlflow.MlflowClient, "get_registered_model", unavailable)
        registry.promote(better)
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version == champion.version
    assert CHALLENGER not in client.get_registered_model(REGISTERED_MODEL).aliases


def test_a_model_averaging_over_shifted_views_is_exported_for_raw_pixels(shared_store, monkeypatch, synthetic_splits):
    import torch

    from pipeline.training.config import TrainConfig
    from pipeline.tracking.export import log_raw_pixel_model
    from pipeline.training.models import TranslateFlipAveraged, build_model

    use, _ = shared_store
    use(monkeypatch)
    torch.manual_seed(0)
    network = build_model(TrainConfig(model="cnn", cnn_channels=(4, 8), cnn_convs_per_stage=2, cnn_pool_first=True))
    averaging = TranslateFlipAveraged(network, synthetic_splits.background).eval()
    with mlflow.start_run() as run:  # a run to log to, as a trial's; log_raw_pixel_model reopens it
        pass
    uri = log_raw_pixel_model(run.info.run_id, averaging, synthetic_splits)
    raw = (synthetic_splits.val_images[:6, 0] * synthetic_splits.std + synthetic_splits.mean) * 255  # pixels 0-255
    scores = np.asarray(mlflow.pyfunc.load_model(uri).predict(raw.numpy().astype(np.float32)))
    with torch.inference_mode():
        expected = averaging(synthetic_splits.val_images[:6]).exp().numpy()
    assert scores.shape == (6, 10)
    np.testing.assert_allclose(scores, expected, atol=1e-4)  # the six views, computed behind the raw-pixel signature
