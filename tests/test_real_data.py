"""On the real Fashion-MNIST (`make data`); CI runs these."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.training.config import TrainConfig
from pipeline.data.dataset import CUSTOM_ENV_VAR, ENV_VAR, DatasetError, find_raw_files, load_fashion_mnist, make_splits
from pipeline.training.train import train

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def real_dataset():
    return load_fashion_mnist()


def test_the_real_dataset_is_the_published_one(real_dataset):
    assert real_dataset.train_images.shape == (60_000, 28, 28)
    assert real_dataset.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(real_dataset.train_labels).tolist() == [6_000] * 10
    assert torch.bincount(real_dataset.test_labels).tolist() == [1_000] * 10
    assert real_dataset.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert (real_dataset.train_images.float() / 255).mean().item() == pytest.approx(0.2860, abs=5e-5)
    assert real_dataset.kind == "official"


def test_one_changed_label_in_a_copy_of_the_real_files_is_refused(real_dataset, tmp_path):
    import gzip
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(real_dataset.source, copy)
    assert load_fashion_mnist(copy).checksum == real_dataset.checksum  # an exact copy is the official data
    labels = copy / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[8 + 123] = (content[8 + 123] + 1) % 10  # one label, still a valid class
    labels.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz is corrupt"):
        load_fashion_mnist(copy)


def test_one_epoch_on_a_subset_passes_80_percent_validation(real_dataset):
    config = TrainConfig(epochs=1, train_subset=10_000)
    splits = make_splits(real_dataset, val_size=config.val_size, train_subset=config.train_subset)
    assert len(splits.train_labels) == 10_000 and len(splits.val_labels) == 10_000
    torch.set_num_threads(2)
    result = train(config, splits, device="cpu")
    assert result.best_val_accuracy > 0.80


OUTSIDE_CLIENT = '''
import gzip, sys
import mlflow
import numpy as np

def idx(path, offset):
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

mlflow.set_tracking_uri(sys.argv[1])
images = idx(sys.argv[2], 16).reshape(-1, 28, 28)
labels = idx(sys.argv[3], 8)
model = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier@champion")
scores = np.concatenate([model.predict(images[i:i + 2000].astype(np.float32)) for i in range(0, 10000, 2000)])
print((scores.argmax(axis=1) == labels).mean())
'''


def test_tune_promote_and_evaluate_on_the_real_data_as_a_user_would(tmp_path, real_dataset):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, CUSTOM_ENV_VAR)}
    # The shipped mlp study, shrunk to one trial of one epoch on 5,000 training images.
    tuned = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--study", "mlp", "--trials", "1",
                            "--set", "epochs=1", "--set", "train_subset=5000", "--storage",
                            f"sqlite:///{tmp_path / 'optuna.db'}", "--device", "cpu", "--json"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    summary = json.loads(tuned.stdout.strip().splitlines()[-1])
    assert summary["promotion"]["outcome"] == "promoted to champion"
    assert summary["best_trial"]["val_accuracy"] > 0.75

    evaluated = subprocess.run([sys.executable, "-m", "pipeline", "evaluate-best", "--json", "--reports-dir",
                                str(tmp_path / "reports")], capture_output=True, text=True, env=env, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["n_test_images"] == 10_000 and result["test_accuracy"] > 0.75
    assert "Shirt" in evaluated.stdout  # the per-class table
    assert (tmp_path / "reports" / f"fashion-mnist-classifier-v{result['version']}" / "report.html").is_file()
    import mlflow

    version = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version(
        "fashion-mnist-classifier", str(result["version"]))
    assert version.tags["dataset"] == "official"
    assert float(version.tags["test_accuracy"]) == pytest.approx(result["test_accuracy"])
    assert version.tags["evaluation_run_id"] == result["mlflow_run_id"]

    # An outside client: plain MLflow and numpy on the raw test files, nothing from this project.
    files = find_raw_files(real_dataset.source)
    client = subprocess.run([sys.executable, "-c", OUTSIDE_CLIENT, env["MLFLOW_TRACKING_URI"],
                             str(files["t10k-images-idx3-ubyte"]), str(files["t10k-labels-idx1-ubyte"])],
                            capture_output=True, text=True, env=env, timeout=300)
    assert client.returncode == 0, client.stderr
    assert float(client.stdout.strip().splitlines()[-1]) == pytest.approx(result["test_accuracy"])
