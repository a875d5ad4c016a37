import math

import pytest
import torch

from pipeline.data.dataset import Splits, normalize
from pipeline.training.models import build_model
from pipeline.training.train import NonFiniteLossError, make_optimizer, make_scheduler, train


def test_loss_goes_down_and_the_model_learns(synthetic_splits, tiny_config):
    result = train(tiny_config.replace(epochs=3), synthetic_splits, device="cpu")
    losses = [m.train_batch_loss for m in result.history]
    assert losses[-1] < losses[0]
    assert result.best_val_accuracy > 0.9
    assert [m.epoch for m in result.history] == [1, 2, 3]


class FakeClock:
    """The trainer's clock: the real one, plus the seconds ``sleep`` pretends to pass (no real wait)."""

    def __init__(self):
        import time

        self.real, self.slept = time.perf_counter, 0.0

    def perf_counter(self) -> float:
        return self.real() + self.slept

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


def slow_validation(monkeypatch, accuracies=None, seconds=0.0, clock=None):
    """Wrap the trainer's validation: take ``seconds`` on ``clock`` and, when given, report these
    accuracies in turn. Returns the model states seen at each validation."""
    import pipeline.training.train as trainer

    real, states, calls = trainer.nll_and_accuracy, [], iter(accuracies or [])

    def validation(model, images, labels):
        if clock is not None:
            clock.sleep(seconds)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        loss, accuracy = real(model, images, labels)
        return loss, next(calls, accuracy)

    monkeypatch.setattr(trainer, "nll_and_accuracy", validation)
    return states


def test_epoch_seconds_cover_training_and_validation_but_not_the_callback(synthetic_splits, tiny_config, monkeypatch):
    # On a fake clock: validation takes 30 s and the hook an hour, without waiting for either.
    import pipeline.training.train as trainer

    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    slow_validation(monkeypatch, seconds=30, clock=clock)
    result = train(tiny_config, synthetic_splits, device="cpu", on_epoch_end=lambda epoch, m: clock.sleep(3600))
    for m in result.history:
        assert m.train_seconds > 0 and m.epoch_seconds - m.train_seconds >= 30  # validation is in the epoch ...
        assert m.epoch_seconds < 3600  # ... a slow hook (MLflow, Optuna) is not
    assert result.seconds >= 2 * 3630  # the whole run's time counts everything


def test_the_returned_model_holds_the_best_epochs_weights(synthetic_splits, tiny_config, monkeypatch):
    states = slow_validation(monkeypatch, accuracies=[0.5, 0.9, 0.7])  # epoch 2 is the best
    result = train(tiny_config.replace(epochs=3), synthetic_splits, device="cpu")
    assert result.best_epoch == 2 and result.best_val_accuracy == 0.9
    final = result.model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[2][k]) for k in final)  # not the last epoch's
    assert not result.model.training


def test_two_seeded_runs_give_identical_weights(synthetic_splits, tiny_config):
    config = tiny_config.replace(augment="crop-flip")
    first = train(config, synthetic_splits, device="cpu").network.state_dict()
    second = train(config, synthetic_splits, device="cpu").network.state_dict()
    other_seed = train(config.replace(seed=1), synthetic_splits, device="cpu").network.state_dict()
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
        calls.append((epoch, metrics))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config.replace(epochs=5), synthetic_splits, device="cpu", on_epoch_end=on_epoch_end)
    assert [epoch for epoch, _ in calls] == [1, 2]  # stopped when the callback raised
    assert [metrics.epoch for _, metrics in calls] == [1, 2]  # each call carries that epoch's metrics


def test_patience_stops_a_run_that_no_longer_improves(synthetic_splits, tiny_config):
    # A learning rate this small leaves validation accuracy flat after the first epoch.
    config = tiny_config.replace(epochs=10, patience=2, lr=1e-9, schedule="none")
    result = train(config, synthetic_splits, device="cpu")
    assert result.stopped_early
    assert result.epochs_run < 10
    assert result.epochs_run - result.best_epoch == 2


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["onecycle", "wsd", "cosine", "plateau", "none"])
def test_every_optimizer_and_schedule_trains(synthetic_splits, tiny_config, optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    config = tiny_config.replace(optimizer=optimizer, schedule=schedule, lr=lr, epochs=2)
    result = train(config, synthetic_splits, device="cpu")
    assert result.best_val_accuracy >= 0.95  # the synthetic bars: every combination reaches 100 % in two epochs
    if schedule in ("onecycle", "wsd", "cosine"):
        assert result.history[-1].lr < lr / 10  # annealed by the end


def test_wsd_runs_every_length_at_the_same_rate_until_its_decay(synthetic_splits, tiny_config):
    # An 8-epoch trial and a 16-epoch final run: one epoch's warm-up, then the full rate in both until the
    # shorter one's last quarter, so a pruning rung before it sees every trial at the same rate.
    def rates(epochs):
        return [m.lr for m in train(tiny_config.replace(schedule="wsd", epochs=epochs), synthetic_splits,
                                    device="cpu").history]

    short, long = rates(8), rates(16)
    assert short[:6] == long[:6] == [pytest.approx(tiny_config.lr)] * 6  # epochs 1-6: warm-up done after epoch 1
    assert short[6] == pytest.approx(tiny_config.lr / 2) and short[7] == 0  # the last quarter: down to zero
    assert long[11] == pytest.approx(tiny_config.lr) and long[12] < tiny_config.lr and long[15] == 0


@pytest.mark.parametrize("optimizer, batch_size, factor", [("adamw", 256, 2 ** 0.5), ("adam", 32, 0.5),
                                                           ("sgd", 256, 2.0), ("sgd", 64, 0.5)])
def test_lr_given_per_reference_batch_scales_with_the_batch_size(tiny_config, optimizer, batch_size, factor):
    # Square root for Adam-type optimizers, linear for SGD; lr_reference_batch = 0 leaves lr alone.
    config = tiny_config.replace(optimizer=optimizer, batch_size=batch_size, lr=0.01, lr_reference_batch=128)
    model = build_model(config)
    assert make_optimizer(config, model).param_groups[0]["lr"] == pytest.approx(0.01 * factor)
    plain = config.replace(lr_reference_batch=0)
    assert make_optimizer(plain, model).param_groups[0]["lr"] == 0.01
    # OneCycle peaks at the scaled rate too.
    stepped = make_optimizer(config, model)
    scheduler = make_scheduler(config.replace(schedule="onecycle"), stepped, steps_per_epoch=10)
    rates = []
    for _ in range(config.epochs * 10):
        stepped.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert max(rates) == pytest.approx(0.01 * factor, rel=1e-2)


def test_the_cnn_trains_through_the_same_trainer(synthetic_splits, tiny_config):
    config = tiny_config.replace(model="cnn", cnn_channels=(4, 8), cnn_head_width=16, augment="crop-flip", lr=1e-2,
                                 epochs=3)
    result = train(config, synthetic_splits, device="cpu")
    assert result.best_val_accuracy >= 0.95  # 99 % here: the synthetic bars are learnt, not guessed (10 % by chance)


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


@pytest.mark.parametrize("model, options", [("mlp", {}), ("cnn", {}),
                                            ("cnn", {"cnn_pool_first": True, "tta": "flip-translate"})])
def test_a_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(synthetic_splits, tiny_config, tmp_path,
                                                                         model, options):
    # Dropout, augmentation and a per-batch schedule: every random generator and the scheduler must resume.
    config = tiny_config.replace(model=model, epochs=4, dropout=0.3, augment="crop-flip", schedule="onecycle",
                                 cnn_channels=(4, 8), cnn_convs_per_stage=2, **options)
    whole = train(config, synthetic_splits, device="cpu")

    from pipeline.training.checkpoints import TrialCheckpoint

    checkpoint = TrialCheckpoint(tmp_path / "trial-0.pt", [])

    def killed_after_epoch_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, synthetic_splits, device="cpu", on_epoch_end=killed_after_epoch_2, on_checkpoint=checkpoint.save)
    state = TrialCheckpoint(tmp_path / "trial-1.pt", [tmp_path / "trial-0.pt"]).load()
    assert state["epoch"] == 2
    epochs_after_resume = []
    resumed = train(config, synthetic_splits, device="cpu", resume_from=state,
                    on_epoch_end=lambda epoch, metrics: epochs_after_resume.append(epoch))

    assert epochs_after_resume == [3, 4]  # not from epoch 1
    assert [m.val_accuracy for m in resumed.history] == [m.val_accuracy for m in whole.history]
    assert [m.train_batch_loss for m in resumed.history] == [m.train_batch_loss for m in whole.history]
    assert (resumed.best_val_accuracy, resumed.best_epoch) == (whole.best_val_accuracy, whole.best_epoch)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_only_a_checkpoint_of_the_same_parameters_and_settings_is_resumed(tmp_path):
    from pipeline.training.checkpoints import TrialCheckpoint

    TrialCheckpoint(tmp_path / "trial-3.pt", [], identity="lr=0.01").save({"epoch": 2})
    # Trial 3 of a study of the same name elsewhere, or run with other settings: not these weights.
    assert TrialCheckpoint(tmp_path / "trial-5.pt", [tmp_path / "trial-3.pt"], identity="lr=0.1").load() is None
    # A trial's own number never resumes: a new study reusing the number starts at epoch 1.
    assert TrialCheckpoint(tmp_path / "trial-3.pt", [], identity="lr=0.01").load() is None
    assert TrialCheckpoint(tmp_path / "trial-5.pt", [tmp_path / "trial-3.pt"], identity="lr=0.01").load()["epoch"] == 2


def test_mirror_averaging_is_kept_only_when_it_validates_better(synthetic_splits, tiny_config):
    from pipeline.training.models import FlipAveraged
    from pipeline.training.train import nll_and_accuracy

    result = train(tiny_config.replace(augment="flip", epochs=2), synthetic_splits, device="cpu")
    _, plain = nll_and_accuracy(result.network, synthetic_splits.val_images, synthetic_splits.val_labels)
    _, mirrored = nll_and_accuracy(FlipAveraged(result.network), synthetic_splits.val_images,
                                   synthetic_splits.val_labels)
    assert result.best_val_accuracy == max(plain, mirrored)  # what the study sees is what the model does
    assert result.flip_averaged == (mirrored > plain)
    _, returned = nll_and_accuracy(result.model, synthetic_splits.val_images, synthetic_splits.val_labels)
    assert returned == result.best_val_accuracy


def test_mirror_averaging_is_left_out_when_it_would_hurt():
    from torch import nn

    from pipeline.training.train import TrainResult, _average_over_views_if_better

    # Two classes told apart only by which half of the image is bright, and a network that reads
    # exactly that: averaging it with its mirror image makes every prediction a coin toss.
    images = torch.zeros(200, 1, 28, 28)
    labels = torch.arange(200) % 2
    images[labels == 0, :, :, :14] = 1.0
    images[labels == 1, :, :, 14:] = 1.0
    reader = nn.Linear(28 * 28, 2, bias=False)
    with torch.no_grad():
        halves = torch.zeros(2, 28, 28)
        halves[0, :, :14], halves[1, :, 14:] = 1.0, 1.0
        reader.weight.copy_(halves.view(2, -1))
    network = nn.Sequential(nn.Flatten(), reader, nn.LogSoftmax(dim=1)).eval()
    result = TrainResult(model=network, best_val_accuracy=1.0)
    _average_over_views_if_better(result, Splits(images, labels, images, labels, mean=0.0, std=1.0), "flip")
    assert not result.flip_averaged and result.model is network and result.best_val_accuracy == 1.0


def test_translate_averaging_is_kept_only_when_it_validates_better_and_keeps_the_signature(synthetic_splits,
                                                                                          tiny_config):
    from pipeline.training.models import FlipAveraged, TranslateFlipAveraged
    from pipeline.training.train import nll_and_accuracy

    config = tiny_config.replace(model="cnn", cnn_channels=(4, 8), cnn_convs_per_stage=1, augment="crop-flip",
                                 epochs=2)
    result = train(config.replace(tta="flip-translate"), synthetic_splits, device="cpu")
    views = {"none": result.network, "flip": FlipAveraged(result.network),
             "flip-translate": TranslateFlipAveraged(result.network, synthetic_splits.background)}
    accuracy = {name: nll_and_accuracy(model, synthetic_splits.val_images, synthetic_splits.val_labels)[1]
                for name, model in views.items()}
    assert result.best_val_accuracy == max(accuracy.values())
    assert result.tta_val_accuracy == accuracy  # each averaging tried is reported as it validated
    expected = "flip-translate" if accuracy["flip-translate"] > max(accuracy["none"], accuracy["flip"]) else \
        "flip" if accuracy["flip"] > accuracy["none"] else "none"
    assert result.tta == expected
    images = synthetic_splits.val_images[:5]
    with torch.inference_mode():
        log_probs = views["flip-translate"].eval()(images)
        assert log_probs.shape == (5, 10)  # the exported model's signature: images in, log-probabilities out
        assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(5), atol=1e-5)
        assert not torch.allclose(log_probs, views["flip"].eval()(images), atol=1e-4)  # the shifts count
        # Half the weight on the image and its mirror image, a quarter on each one-pixel move (down-right,
        # up-left) with the uncovered border filled with the background, as training's crops fill it.
        down_right = torch.full_like(images, synthetic_splits.background)
        down_right[..., 1:, 1:] = images[..., :-1, :-1]
        up_left = torch.full_like(images, synthetic_splits.background)
        up_left[..., :-1, :-1] = images[..., 1:, 1:]
        flip = views["flip"].eval()
        mixture = 0.5 * flip(images).exp() + 0.25 * flip(down_right).exp() + 0.25 * flip(up_left).exp()
        assert torch.allclose(log_probs.exp(), mixture, atol=1e-5)
    mirror_only = train(config.replace(tta="flip"), synthetic_splits, device="cpu")
    assert set(mirror_only.tta_val_accuracy) == {"none", "flip"}  # tta = "flip" never tries the shifted views
    none = train(config.replace(tta="none"), synthetic_splits, device="cpu")
    assert none.tta == "none" and not none.tta_val_accuracy and none.model is none.network


def test_mirror_averaging_gives_probabilities_that_ignore_mirroring(synthetic_splits, tiny_config):
    from pipeline.training.models import FlipAveraged

    network = train(tiny_config.replace(epochs=1), synthetic_splits, device="cpu").network
    averaged = FlipAveraged(network).eval()
    images = synthetic_splits.val_images[:8]
    with torch.inference_mode():
        log_probs = averaged(images)
        assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(8), atol=1e-5)
        assert torch.allclose(log_probs, averaged(images.flip(-1)), atol=1e-5)
        assert not torch.allclose(network(images), network(images.flip(-1)), atol=1e-3)


def test_bfloat16_precision_trains_and_differs_from_float32(synthetic_splits, tiny_config):
    # precision=auto picks one of these by hardware; both must learn, and the setting must take effect.
    config = tiny_config.replace(model="cnn", cnn_channels=(4, 8), cnn_convs_per_stage=1, cnn_head_width=16,
                                 epochs=2, lr=1e-2)
    half = train(config.replace(precision="bfloat16"), synthetic_splits, device="cpu")
    full = train(config.replace(precision="float32"), synthetic_splits, device="cpu")
    assert half.best_val_accuracy >= 0.95 and full.best_val_accuracy >= 0.95  # both 100 % here
    assert half.history[0].train_batch_loss != full.history[0].train_batch_loss
