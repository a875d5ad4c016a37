"""The model families. Both take normalized images (N, 1, 28, 28) and return log-probabilities (N, 10)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import IMAGE_SIDE, N_CLASSES

DEFAULTS = TrainConfig()  # the models' own defaults are the config's, so MLP() is `make train`'s network


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``torch.rand`` on the CPU.

    ``nn.Dropout`` draws its mask with ``bernoulli_``, and PyTorch's CPU kernel for that takes its
    vectorized MKL path on Intel processors only: on AMD ones it falls back to a serial loop of
    double-precision draws, 2.4x slower than ``rand`` for a 64x512 batch (a tenth of an MLP step
    on this project's AMD test machine). Same distribution, same seeding; GPUs keep the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).div_(1 - self.p)


class LogSoftmax(nn.LogSoftmax):
    """``nn.LogSoftmax`` computed in float32 whatever the autocast dtype: the loss and its gradient
    keep full precision when the layers before run in bfloat16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class MLP(nn.Sequential):
    """The notebook's network: Flatten, then per hidden width Linear -> BatchNorm -> ReLU -> Dropout,
    then Linear -> LogSoftmax. With the default widths it is 784-512-256-128-10."""

    def __init__(self, hidden_sizes=DEFAULTS.hidden_sizes, *, dropout=DEFAULTS.dropout, batch_norm=DEFAULTS.batch_norm,
                 n_classes=N_CLASSES):
        layers: list[nn.Module] = [nn.Flatten()]
        width = IMAGE_SIDE * IMAGE_SIDE
        for hidden in hidden_sizes:
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers += [nn.ReLU(inplace=True), Dropout(dropout)]
            width = hidden
        layers += [nn.Linear(width, n_classes), LogSoftmax(dim=1)]
        super().__init__(*layers)


class ConvBlock(nn.Module):
    """3x3 convolution -> BatchNorm -> ReLU, with an identity skip when asked and shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, *, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.residual = residual and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        if self.residual:
            out = out + x
        return torch.relu(out)


class CNN(nn.Module):
    """Stages of 3x3 conv blocks, each stage ending in 2x2 max pooling and dropout, then a dense head.

    ``channels`` gives one stage per entry (28 -> 14 -> 7 -> 3 pixels); ``residual`` adds an identity
    skip around every block after a stage's first (the one that changes the channel count).
    """

    def __init__(self, channels=DEFAULTS.cnn_channels, *, convs_per_stage=DEFAULTS.cnn_convs_per_stage,
                 residual=DEFAULTS.cnn_residual, head_width=DEFAULTS.cnn_head_width, dropout=DEFAULTS.dropout,
                 n_classes=N_CLASSES):
        super().__init__()
        stages: list[nn.Module] = []
        in_channels, side = 1, IMAGE_SIDE
        for out_channels in channels:
            blocks = [ConvBlock(in_channels if i == 0 else out_channels, out_channels, residual=residual)
                      for i in range(convs_per_stage)]
            stages += [*blocks, nn.MaxPool2d(2), Dropout(dropout)]
            in_channels, side = out_channels, side // 2
        self.features = nn.Sequential(*stages)
        flat = in_channels * side * side
        head: list[nn.Module] = [nn.Flatten()]
        if head_width:
            head += [nn.Linear(flat, head_width), nn.BatchNorm1d(head_width), nn.ReLU(inplace=True),
                     Dropout(dropout)]
            flat = head_width
        head += [nn.Linear(flat, n_classes), LogSoftmax(dim=1)]
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FlipAveraged(nn.Module):
    """Test-time augmentation: the mean of the model's probabilities for the image and for its mirror
    image, as log-probabilities. Same input and output as the model it wraps, so an exported model
    keeps its signature; worth it for a model trained on flipped images (see train.py)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original, mirrored = self.model(torch.cat([x, x.flip(-1)])).chunk(2)
        return torch.logaddexp(original, mirrored) - math.log(2)


def build_model(config: TrainConfig) -> nn.Module:
    if config.model == "mlp":
        return MLP(config.hidden_sizes, dropout=config.dropout, batch_norm=config.batch_norm)
    return CNN(config.cnn_channels, convs_per_stage=config.cnn_convs_per_stage, residual=config.cnn_residual,
               head_width=config.cnn_head_width, dropout=config.dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
