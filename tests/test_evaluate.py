"""evaluate-best on a tiny registered model, in a temporary MLflow store (see conftest)."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from pipeline.reports.evaluate import evaluate_registered
from pipeline.tracking.registry import REGISTERED_MODEL, RegistryError
from pipeline.search.session import run_session
from tests.conftest import free_port
from tests.shrunk import LEARNS, enqueue, session, tracker_for


@pytest.fixture(scope="module")
def _champion(shared_store):
    """A champion trained by a one-trial mlp study on the synthetic data."""
    use, folder = shared_store
    with pytest.MonkeyPatch.context() as monkeypatch:
        use(monkeypatch)
        enqueue(folder, "mlp", LEARNS)
        tuning = session(folder, trials=1)
        run_session(tuning, tracker_for(tuning))
    return folder


@pytest.fixture
def registered(_champion, shared_store, monkeypatch):
    shared_store[0](monkeypatch)
    return _champion


def test_the_report_scores_the_registered_model_as_an_outside_client_sees_it(registered, synthetic_dataset):
    result = evaluate_registered(prune_sweep=True, reports_dir=registered / "reports")

    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")  # as an outside client
    raw = synthetic_dataset.test_images.numpy().astype(np.float32)
    labels = synthetic_dataset.test_labels.numpy()
    predictions = np.asarray(model.predict(raw)).argmax(axis=1)
    assert result["test_accuracy"] == pytest.approx((predictions == labels).mean())
    assert result["test_accuracy"] > 0.9  # the exported model normalizes raw pixels as training did
    matrix = np.asarray(result["confusion_matrix"])
    assert (matrix.sum(axis=1) == 20).all()  # one row per true class, 20 test images each
    assert np.trace(matrix) / matrix.sum() == pytest.approx(result["test_accuracy"])
    assert result["n_test_images"] == len(labels) and result["dataset"] == "custom"

    sweep = result["prune_sweep"]
    assert [p["sparsity"] for p in sweep] == [0.0, 0.5, 0.7, 0.9]
    assert [p["zero_weights"] for p in sweep] == pytest.approx([0.0, 0.5, 0.7, 0.9], abs=0.01)
    assert sweep[0]["test_accuracy"] == result["test_accuracy"]  # 0 % pruned: the model as scored
    assert sweep[-1]["test_accuracy"] < sweep[0]["test_accuracy"]  # nine weights in ten gone: it shows

    folder = registered / "reports" / f"{REGISTERED_MODEL}-v{result['version']}"
    assert json.loads((folder / "metrics.json").read_text())["test_accuracy"] == result["test_accuracy"]
    page = (folder / "report.html").read_text()
    assert page.count("Plotly.newPlot") == 4  # confusion, per class, reliability, pruning
    assert "<script src=" not in page and "data:image/png;base64," in page  # opens offline: nothing fetched
    assert "Reliability diagram" in page


def test_the_evaluation_is_an_mlflow_run_linked_to_the_version(registered):
    result = evaluate_registered(reports_dir=registered / "reports")
    client = mlflow.MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert run.data.tags["model_version"] == str(result["version"]) and run.data.tags["kind"] == "evaluation"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"report.html", "metrics.json", "test_confusion_matrix.png", "test_confusion_matrix.json"}
    assert run.data.tags["dataset"] == "custom"
    [test_data] = run.inputs.dataset_inputs  # the run page's Datasets: the test split, and only it
    assert test_data.tags[0].value == "test" and json.loads(test_data.dataset.profile)["images"] == result["n_test_images"]
    version = client.get_model_version(REGISTERED_MODEL, str(result["version"]))
    assert "test_accuracy" not in version.tags  # a custom dataset's score is not the version's test accuracy


def test_a_missing_model_or_alias_is_a_clear_error(registered):
    with pytest.raises(RegistryError, match="no registered model 'nope'.*make tune"):
        evaluate_registered("nope")
    with pytest.raises(RegistryError, match="has no alias 'gold'"):
        evaluate_registered(alias="gold")
    with pytest.raises(RegistryError, match="has no version 99"):
        evaluate_registered(alias=None, version=99)


@pytest.mark.slow
def test_evaluate_best_without_a_registry_is_one_line_and_no_traceback(tmp_path, synthetic_env):
    done = subprocess.run([sys.executable, "-m", "pipeline", "evaluate-best"], capture_output=True, text=True,
                          env={**synthetic_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"},
                          timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make tune" in errors[0]


@pytest.mark.slow
def test_the_champion_served_by_mlflow_answers_raw_pixels(registered, synthetic_dataset):
    import os
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    log = open(registered / "serve.log", "w+")  # a file, not a pipe nobody reads while the server talks
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port)], env=dict(os.environ),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    images = synthetic_dataset.test_images[:40].numpy().astype(float).tolist()  # raw 0-255, (40, 28, 28)
    labels = synthetic_dataset.test_labels[:40].numpy()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps({"inputs": images}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        deadline, answer = time.time() + 120, None
        while answer is None and time.time() < deadline and server.poll() is None:
            try:
                answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
            except urllib.error.HTTPError as refused:  # it answered, with an error: say which
                raise AssertionError(f"{refused.code}: {refused.read()[:500]!r}") from None
            except OSError:  # not listening yet
                time.sleep(0.5)
        log.seek(0)
        assert answer is not None, log.read()[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    probabilities = np.asarray(answer["predictions"])
    assert probabilities.shape == (40, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.9
