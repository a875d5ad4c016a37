"""The shared trainer. It knows nothing of Optuna or MLflow: ``on_epoch_end`` is its only door out.

Data arrive as tensors (already normalized); they are moved to the device once, batched by
slicing a random permutation there, and augmented a whole batch at a time. Per-step losses
and hits are summed on the device and read once per epoch: each ``.item()`` is a device sync.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training.config import TrainConfig
from pipeline.data.dataset import Splits, augment, shuffled_batches
from pipeline.training.device import training_dtype
from pipeline.errors import PipelineError
from pipeline.training.models import FlipAveraged, TranslateFlipAveraged, build_model

PREDICT_BATCH_SIZE = 2048  # images per forward pass when predicting; bounds activation memory, not a hyperparameter


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_batch_loss: float  # mean loss over the epoch's training batches, as optimized (label smoothing included)
    train_batch_accuracy: float  # fraction right on the training batches as trained (train mode: dropout, augmented)
    val_loss: float  # mean negative log-likelihood on the validation split (no label smoothing), eval mode
    val_accuracy: float  # fraction
    lr: float  # learning rate at the end of the epoch
    train_seconds: float  # the optimization steps alone
    epoch_seconds: float  # steps plus validation


EpochCallback = Callable[[int, EpochMetrics], None]


@dataclass
class TrainResult:
    model: nn.Module  # in eval mode, holding the best epoch's weights
    history: list[EpochMetrics] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    tta: str = "none"  # the test-time augmentation ``model`` does: "none", "flip" or "flip-translate"
    tta_val_accuracy: dict[str, float] = field(default_factory=dict)  # each averaging tried, as it validated

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def flip_averaged(self) -> bool:
        """Whether ``model`` averages its predictions over the mirror image (and perhaps more views): the
        run tag and JSON key of that name predate ``tta`` and are kept for what reads them."""
        return self.tta != "none"

    @property
    def network(self) -> nn.Module:
        """The trained network itself, without the test-time augmentation ``model`` may add."""
        model = self.model
        while isinstance(model, (FlipAveraged, TranslateFlipAveraged)):
            model = model.model
        return model


class NonFiniteLossError(PipelineError, FloatingPointError):
    """The training loss became NaN or infinite: the run cannot recover, so it stops."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"training loss became {loss} in epoch {epoch}; lower the learning rate")
        self.epoch = epoch
        self.loss = loss


def train(config: TrainConfig, data: Splits, *, device: torch.device | str,
          on_epoch_end: EpochCallback | None = None, resume_from: dict | None = None,
          on_checkpoint: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``config`` on ``data``; return the history and the model at its best validation epoch.

    ``on_epoch_end(epoch, metrics)`` runs after each epoch's validation; an exception raised there
    (Optuna's TrialPruned, say) ends training and propagates to the caller.

    ``on_checkpoint(state)`` receives, after each epoch (before ``on_epoch_end``), everything needed
    to go on from there: weights, optimizer, scheduler, random generators, best-so-far and history.
    ``resume_from`` takes such a state and continues at the next epoch; with the same config and
    data the result is the one an uninterrupted run gets.
    """
    device = torch.device(device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)  # model initialization and dropout
    generator = torch.Generator(device=device).manual_seed(config.seed)  # shuffling and augmentation

    data = data.to(device)
    model = build_model(config).to(device)
    train_images = data.train_images
    if config.model == "cnn":
        # Convolutions run 1.3-3x faster on NHWC: tensor cores on a GPU, oneDNN's kernels on a CPU.
        model = model.to(memory_format=torch.channels_last)
        train_images = train_images.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)
    dtype = training_dtype(config.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    result = TrainResult(model=model)
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_improvement = 0
    first_epoch = 1
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_from["scheduler"])
        torch.set_rng_state(resume_from["torch_rng"])
        generator.set_state(resume_from["generator"])
        if device.type == "cuda" and resume_from.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_from["cuda_rng"], device)
        best_state = resume_from["best_state"]
        result.best_val_accuracy, result.best_epoch = resume_from["best_val_accuracy"], resume_from["best_epoch"]
        result.history = [EpochMetrics(**m) for m in resume_from["history"]]
        epochs_without_improvement = resume_from["epochs_without_improvement"]
        first_epoch = resume_from["epoch"] + 1
        if config.patience and epochs_without_improvement >= config.patience:
            first_epoch, result.stopped_early = config.epochs + 1, True
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for images, labels in shuffled_batches(train_images, data.train_labels, config.batch_size, generator):
            if config.augment != "none":
                images = augment(images, generator, fill=data.background, crop=config.augment == "crop-flip")
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                log_probs = model(images)
                loss = smoothed_nll(log_probs, labels, config.label_smoothing)
            loss.backward()
            optimizer.step()
            if config.schedule in PER_STEP_SCHEDULES:
                scheduler.step()
            loss_sum += loss.detach() * len(labels)
            hits += (log_probs.argmax(dim=1) == labels).sum()
            seen += len(labels)
        loss_total, hit_total = torch.stack([loss_sum, hits.to(loss_sum.dtype)]).tolist()  # the epoch's one sync
        train_loss = loss_total / seen
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(epoch, train_loss)
        train_seconds = time.perf_counter() - epoch_started

        val_loss, val_accuracy = nll_and_accuracy(model, data.val_images, data.val_labels)
        if config.schedule == "plateau":
            scheduler.step(val_accuracy)
        metrics = EpochMetrics(
            epoch=epoch,
            train_batch_loss=train_loss,
            train_batch_accuracy=hit_total / seen,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=optimizer.param_groups[0]["lr"],
            train_seconds=train_seconds,
            epoch_seconds=time.perf_counter() - epoch_started,
        )
        result.history.append(metrics)

        if val_accuracy > result.best_val_accuracy:
            result.best_val_accuracy, result.best_epoch = val_accuracy, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        if on_checkpoint is not None:
            on_checkpoint({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best_state": best_state, "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch, "epochs_without_improvement": epochs_without_improvement,
                "history": [asdict(m) for m in result.history],
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if config.patience and epochs_without_improvement >= config.patience:
            result.stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if config.augment != "none" and config.tta != "none" and result.history:
        _average_over_views_if_better(result, data, config.tta)
    result.seconds = time.perf_counter() - started
    return result


def _average_over_views_if_better(result: TrainResult, data: Splits, tta: str) -> None:
    """A model trained on mirrored (and shifted) images predicts those views well too: averaging over
    them often gains a few tenths of a point. Each step (the mirror image, then with "flip-translate"
    the one-pixel shifts) is kept only when validation says so; the model returned (and exported) is
    then the averaging one, and its validation accuracy the result's."""
    candidates = [("flip", FlipAveraged(result.network))]
    if tta == "flip-translate":
        candidates.append(("flip-translate", TranslateFlipAveraged(result.network, data.background)))
    result.tta_val_accuracy["none"] = result.best_val_accuracy
    for name, averaged in candidates:
        _, accuracy = nll_and_accuracy(averaged.eval(), data.val_images, data.val_labels)
        result.tta_val_accuracy[name] = accuracy
        if accuracy > result.best_val_accuracy:
            result.model, result.best_val_accuracy, result.tta = averaged, accuracy, name


def smoothed_nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy on log-probabilities with label smoothing: (1 - s) * NLL + s * mean over classes."""
    nll = F.nll_loss(log_probs, labels)
    if not smoothing:
        return nll
    return (1 - smoothing) * nll - smoothing * log_probs.mean(dim=1).mean()


@torch.inference_mode()
def predict_log_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (N, 10) in float32, evaluated in eval mode, a large batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    with _prediction_autocast(device):
        outputs = [model(images[start:start + PREDICT_BATCH_SIZE].to(device)).float()
                   for start in range(0, len(images), PREDICT_BATCH_SIZE)]
    return torch.cat(outputs)


def nll_and_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy (a fraction) of ``model`` on the given split."""
    log_probs = predict_log_probs(model, images)
    labels = labels.to(log_probs.device)
    loss = F.nll_loss(log_probs, labels).item()
    accuracy = (log_probs.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


def batch_scaled_lr(config: TrainConfig) -> float:
    """The learning rate for the configured batch size: `lr` as it is, or, when `lr_reference_batch` is
    set, `lr` scaled from that batch size: linearly for SGD (Goyal et al., 2017), by the square root for
    Adam and AdamW (Malladi et al., 2022), whose steps do not grow with the gradient's size."""
    if not config.lr_reference_batch:
        return config.lr
    ratio = config.batch_size / config.lr_reference_batch
    return config.lr * (ratio if config.optimizer == "sgd" else math.sqrt(ratio))


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params, lr = model.parameters(), batch_scaled_lr(config)
    if config.optimizer == "sgd":
        # Nesterov needs momentum: with momentum 0 this is plain SGD (torch refuses nesterov=True there).
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel updates every parameter (CPU and CUDA), instead of a loop over tensors.
    return optimizer_class(params, lr=lr, weight_decay=config.weight_decay, fused=True)


PER_STEP_SCHEDULES = ("onecycle", "wsd", "cosine")
WSD_DECAY_SHARE = 0.25  # wsd: the last quarter of the steps decays to zero


def wsd_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Warmup-stable-decay: a linear warm-up, then the full rate, then linearly to zero over the last
    WSD_DECAY_SHARE of the steps. The warm-up is a number of steps, not a share of the run, so a trial
    of 20 epochs and the final phase's 60 follow the same rate until their decays begin."""
    decay_steps = max(1, round(total_steps * WSD_DECAY_SHARE))
    if step >= total_steps - decay_steps:
        return max(0.0, (total_steps - step) / decay_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """OneCycle, wsd and cosine step per batch; reduce-on-plateau steps per epoch on validation accuracy."""
    total_steps = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=batch_scaled_lr(config),
                                                   total_steps=total_steps)
    if config.schedule == "wsd":
        # One epoch's warm-up (a quarter of the run at most).
        factor = functools.partial(wsd_factor, total_steps=total_steps,
                                   warmup_steps=min(steps_per_epoch, max(1, total_steps // 4)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    return None


def _prediction_autocast(device: torch.device):
    # On a GPU, bfloat16 pays and the exported model is not what is scored there. On a CPU, predict in
    # float32 as the exported model does: the validation accuracy that promotes a model is the one
    # clients get.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
