"""Shared fixtures: a tiny synthetic Fashion-MNIST in the original IDX layout, and small configs.

Each synthetic class k is a bright horizontal bar at rows 2k..2k+3 over noise, so a model can
learn it in one or two epochs. The pipeline takes it as a custom dataset ($FASHION_MNIST_CUSTOM_DIR,
or ``custom=True``): the official checksums would rightly reject it.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One test process a core (make test-fast): a process that also trained on two threads, or
    # started a subprocess that did, would fight the other test process for its core.
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

from pipeline.training.config import TrainConfig
from pipeline.data.dataset import CUSTOM_ENV_VAR, RAW_FILES, FashionMNIST, make_splits

PER_CLASS_TRAIN = 60
PER_CLASS_TEST = 20


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: zero, zero, type 0x08 (unsigned byte), the number of dimensions, then each
    dimension as a big-endian uint32, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 4:2 * label + 8, 4:24] = 230
    return images.astype(np.uint8)


def write_dataset(folder: Path, *, compress: bool = True, seed: int = 0, per_class_train: int = PER_CLASS_TRAIN) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
    test_labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS_TEST))
    contents = {
        "train-images-idx3-ubyte": idx_bytes(synthetic_images(train_labels, rng)),
        "train-labels-idx1-ubyte": idx_bytes(train_labels),
        "t10k-images-idx3-ubyte": idx_bytes(synthetic_images(test_labels, rng)),
        "t10k-labels-idx1-ubyte": idx_bytes(test_labels),
    }
    for name in RAW_FILES:
        content = contents[name]
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return folder


def free_port() -> int:
    """A loopback port nothing listens on (yet): for a server a test starts, or one that must be down."""
    from pipeline.network import free_port as any_free_port

    return any_free_port()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic-fashion-mnist"))


@pytest.fixture(scope="session")
def bigger_synthetic_dir(tmp_path_factory) -> Path:
    """10,000 synthetic training images: trials of a few seconds, long enough to be killed mid-way."""
    return write_dataset(tmp_path_factory.mktemp("bigger-synthetic"), per_class_train=1000)


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_dir) -> FashionMNIST:
    from pipeline.data.dataset import load_fashion_mnist

    return load_fashion_mnist(synthetic_dir, custom=True)


@pytest.fixture(scope="session")
def synthetic_splits(synthetic_dataset):
    return make_splits(synthetic_dataset, val_size=200)


@pytest.fixture
def synthetic_env(monkeypatch, synthetic_dir) -> dict[str, str]:
    """The synthetic dataset as the (custom) one the pipeline loads, here and in subprocesses."""
    monkeypatch.setenv(CUSTOM_ENV_VAR, str(synthetic_dir))
    return {**os.environ, CUSTOM_ENV_VAR: str(synthetic_dir)}


@pytest.fixture
def tiny_config() -> TrainConfig:
    """The real default config, shrunk: narrow layers, two epochs, CPU-sized batches."""
    return TrainConfig(hidden_sizes=(64, 32), epochs=2, batch_size=32, lr=3e-3, val_size=200)


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """One decoded-dataset cache for the whole run, never data/cache/: set before any session
    fixture loads a dataset; the first test to load the real dataset fills it."""
    folder = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as session_patch:
        session_patch.setenv("FASHION_MNIST_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def _mlflow_store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once for the run: MLflow's migrations take 3-4 s a
    new store, and every test that tracks would pay them. A test's store starts as a copy: the tables
    and the Default experiment a new store gets, nothing else."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def absent_mlflow_store(tmp_path) -> Path:
    """This test's MLflow store is not made in advance (see _isolated_mlflow_store): for a test that
    checks a command creates none, or that creating one works. Its path."""
    return tmp_path / "mlflow.db"


@pytest.fixture(autouse=True)
def _isolated_mlflow_store(tmp_path, monkeypatch, request):
    """Every test (and the subprocesses it starts) tracks into its own temporary store, never mlruns/,
    and keeps its trials' checkpoints in its own folder, never studies/checkpoints/. The store is a
    copy of an empty one, its tables made, unless the test asks for an absent_mlflow_store."""
    import shutil

    if "absent_mlflow_store" not in request.fixturenames:
        shutil.copyfile(request.getfixturevalue("_mlflow_store_template"), tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory, synthetic_dir, _mlflow_store_template):
    """A store several tests of one module read, filled once (a tracked study costs seconds): yields a
    function that switches this process to it, and the folder. Tests that write to it must not assume
    they are alone in it."""
    import mlflow

    folder = tmp_path_factory.mktemp("shared-store")
    import shutil

    shutil.copyfile(_mlflow_store_template, folder / "mlflow.db")  # an empty store, its tables made
    uri = f"sqlite:///{folder / 'mlflow.db'}"

    def use(monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv(CUSTOM_ENV_VAR, str(synthetic_dir))
        mlflow.set_tracking_uri(uri)

    return use, folder


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread, only overhead
