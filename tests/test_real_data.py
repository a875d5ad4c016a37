"""On the real Fashion-MNIST (`make data`); CI runs these."""

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data import OFFICIAL_SHA256, load_fashion_mnist, make_splits
from pipeline.train import train

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
    assert set(OFFICIAL_SHA256) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def test_one_epoch_on_a_subset_passes_80_percent_validation(real_dataset):
    config = TrainConfig(epochs=1, train_subset=10_000)
    splits = make_splits(real_dataset, val_size=config.val_size, train_subset=config.train_subset)
    assert len(splits.train_labels) == 10_000 and len(splits.val_labels) == 10_000
    torch.set_num_threads(2)
    result = train(config, splits, device="cpu")
    assert result.best_val_accuracy > 0.80
