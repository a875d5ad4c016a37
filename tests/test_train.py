import math

import pytest
import torch

from pipeline.data import Splits, normalize
from pipeline.train import NonFiniteLossError, nll_and_accuracy, train


def test_loss_goes_down_and_the_model_learns(synthetic_splits, tiny_config):
    result = train(tiny_config.replace(epochs=3), synthetic_splits, device="cpu")
    losses = [m.train_batch_loss for m in result.history]
    assert losses[-1] < losses[0]
    assert result.best_val_accuracy > 0.9
    assert [m.epoch for m in result.history] == [1, 2, 3]


def test_epoch_seconds_cover_training_and_validation_but_not_the_callback(synthetic_splits, tiny_config):
    import time

    result = train(tiny_config, synthetic_splits, device="cpu", on_epoch_end=lambda epoch, m: time.sleep(1.0))
    for m in result.history:
        assert 0 < m.train_seconds < m.epoch_seconds  # validation comes on top of the steps
        assert m.epoch_seconds < 1.0  # a slow hook (MLflow, Optuna) is not the epoch's time


def test_the_returned_model_holds_the_best_epoch_weights(synthetic_splits, tiny_config):
    result = train(tiny_config.replace(epochs=3), synthetic_splits, device="cpu")
    _, accuracy = nll_and_accuracy(result.model, synthetic_splits.val_images, synthetic_splits.val_labels)
    assert accuracy == pytest.approx(result.best_val_accuracy)
    assert result.best_val_accuracy == max(m.val_accuracy for m in result.history)
    assert not result.model.training


def test_two_seeded_runs_give_identical_weights(synthetic_splits, tiny_config):
    config = tiny_config.replace(augment="crop-flip")
    first = train(config, synthetic_splits, device="cpu").model.state_dict()
    second = train(config, synthetic_splits, device="cpu").model.state_dict()
    other_seed = train(config.replace(seed=1), synthetic_splits, device="cpu").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


def test_a_non_finite_loss_raises_the_dedicated_error(synthetic_splits, tiny_config):
    images = synthetic_splits.train_images.clone()
    images[7] = math.nan
    poisoned = type(synthetic_splits)(images, synthetic_splits.train_labels, synthetic_splits.val_images,
                                      synthetic_splits.val_labels, synthetic_splits.mean, synthetic_splits.std)
    calls = []
    with pytest.raises(NonFiniteLossError) as raised:
        train(tiny_config, poisoned, device="cpu", on_epoch_end=lambda epoch, m: calls.append(epoch))
    assert raised.value.epoch == 1 and calls == []
    assert "lower the learning rate" in str(raised.value)


def test_the_callback_runs_once_per_epoch_and_can_stop_training(synthetic_splits, tiny_config):
    calls = []

    class Stop(Exception):
        pass

    def on_epoch_end(epoch, metrics):
        calls.append((epoch, metrics.val_accuracy))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config.replace(epochs=5), synthetic_splits, device="cpu", on_epoch_end=on_epoch_end)
    assert [epoch for epoch, _ in calls] == [1, 2]
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in calls)


def test_patience_stops_a_run_that_no_longer_improves(synthetic_splits, tiny_config):
    # A learning rate this small leaves validation accuracy flat after the first epoch.
    config = tiny_config.replace(epochs=10, patience=2, lr=1e-9, schedule="none")
    result = train(config, synthetic_splits, device="cpu")
    assert result.stopped_early
    assert result.epochs_run < 10
    assert result.epochs_run - result.best_epoch == 2


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "plateau", "none"])
def test_every_optimizer_and_schedule_trains(synthetic_splits, tiny_config, optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    config = tiny_config.replace(optimizer=optimizer, schedule=schedule, lr=lr, epochs=2)
    result = train(config, synthetic_splits, device="cpu")
    assert result.best_val_accuracy > 0.5
    if schedule in ("onecycle", "cosine"):
        assert result.history[-1].lr < lr / 10  # annealed by the end


def test_the_cnn_trains_through_the_same_trainer(synthetic_splits, tiny_config):
    config = tiny_config.replace(model="cnn", cnn_channels=(4, 8), cnn_head_width=16, augment="crop-flip")
    result = train(config, synthetic_splits, device="cpu")
    assert result.best_val_accuracy > 0.5


def test_the_plateau_schedule_halves_the_rate_after_two_flat_epochs(synthetic_splits, tiny_config):
    # Plain SGD at a rate this small (no batch norm statistics moving either) leaves validation accuracy
    # flat from the first epoch: every second flat epoch (patience 1) halves the rate.
    config = tiny_config.replace(epochs=5, schedule="plateau", optimizer="sgd", momentum=0.0, lr=1e-6,
                                 batch_norm=False, dropout=0.0)
    result = train(config, synthetic_splits, device="cpu")
    assert len({m.val_accuracy for m in result.history}) == 1
    assert [m.lr for m in result.history] == pytest.approx([1e-6, 1e-6, 5e-7, 5e-7, 2.5e-7], rel=1e-6)


def sided_splits(n: int = 256) -> Splits:
    """Class 0 is a bright left half, class 1 a bright right half: only a mirror image tells them apart."""
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[labels == 0, :, :14] = 255
    images[labels == 1, :, 14:] = 255
    normalized = normalize(images, 0.5, 0.5)
    return Splits(normalized, labels, normalized, labels, mean=0.5, std=0.5)


@pytest.mark.parametrize("augment", ["flip", "crop-flip"])
def test_flip_augmentation_reaches_the_training_batches(tiny_config, augment):
    splits = sided_splits()
    config = tiny_config.replace(epochs=4, dropout=0.0, label_smoothing=0.0)
    plain = train(config, splits, device="cpu")
    flipped = train(config.replace(augment=augment), splits, device="cpu")
    assert plain.best_val_accuracy == 1.0  # the sides are easy to learn ...
    # ... unless half the training images are mirrored, so that each side carries both labels.
    assert max(m.train_batch_accuracy for m in flipped.history) < 0.75
