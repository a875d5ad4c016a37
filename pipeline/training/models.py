"""The model families. Both take normalized images (N, 1, 28, 28) and return log-probabilities (N, 10)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.training.config import TrainConfig
from pipeline.data.dataset import IMAGE_SIDE, N_CLASSES

DEFAULTS = TrainConfig()  # the models' own defaults are the config's, so MLP() is `make train`'s network


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on the CPU.

    On a CPU, drawing the mask is most of dropout's cost: ``nn.Dropout``'s ``bernoulli_`` takes its
    vectorized MKL path on Intel processors only (on AMD ones, a serial loop of double-precision
    draws), and ``torch.rand`` still spends one 32-bit draw per element, then slow boolean passes.
    Here each 64-bit draw of torch's generator gives four independent 16-bit uniforms (``p`` exact to
    1/65,536), turned into a 0/1 mask in the activations' dtype by float arithmetic alone, and laid
    out like them. On the CNN's bfloat16 activations, forward and backward take 2.5x less time than
    with ``rand`` (docs/results.md). Same seeding (torch's global generator, saved in checkpoints);
    GPUs keep the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        # The mask drops p rounded to 1/65,536; the scale stays 1 / (1 - p) as nn.Dropout's, off from the
        # rounded rate's by under 1e-5 of the activation (a shift far below bfloat16's resolution).
        dropped = min(round(self.p * 65536), 65535)
        return x * _keep_mask(x, dropped) * (1 / (1 - self.p))


def _keep_mask(x: torch.Tensor, dropped: int) -> torch.Tensor:
    """1 with probability 1 - dropped / 65,536, else 0: a tensor of ``x``'s shape, dtype and memory layout."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
    uniforms = words.view(torch.int16)[:n].float()  # integers, uniform over -32,768 .. 32,767
    threshold = dropped - 32768  # P(uniform >= threshold) = 1 - dropped / 65,536
    # uniform - (threshold - 1) is >= 1 where kept and <= 0 where dropped: clamped, exactly 1 or 0.
    keep = uniforms.sub_(threshold - 1).clamp_(0, 1).to(x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        batch, channels, height, width = x.shape
        return keep.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return keep.view(x.shape)


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


class PoolingConvBlock(nn.Module):
    """3x3 convolution -> 2x2 max pooling -> BatchNorm -> ReLU. (A class of its own, not an option of
    ConvBlock: registered models are pickled modules, and ConvBlocks pickled earlier must still run.)"""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.pool(self.conv(x))))


class CNN(nn.Module):
    """Stages of 3x3 conv blocks, each stage ending in 2x2 max pooling and dropout, then a dense head.

    ``channels`` gives one stage per entry (28 -> 14 -> 7 -> 3 pixels); ``residual`` adds an identity
    skip around every block after a stage's first (the one that changes the channel count). With
    ``pool_first`` a stage pools right after its first convolution, before batch norm, instead of at
    its end (as airbench does): batch norm, ReLU and the stage's other convolutions then work on a
    quarter of the pixels.
    """

    def __init__(self, channels=DEFAULTS.cnn_channels, *, convs_per_stage=DEFAULTS.cnn_convs_per_stage,
                 residual=DEFAULTS.cnn_residual, head_width=DEFAULTS.cnn_head_width, dropout=DEFAULTS.dropout,
                 pool_first=DEFAULTS.cnn_pool_first, n_classes=N_CLASSES):
        super().__init__()
        stages: list[nn.Module] = []
        in_channels, side = 1, IMAGE_SIDE
        for out_channels in channels:
            blocks: list[nn.Module] = [
                PoolingConvBlock(in_channels, out_channels) if pool_first and i == 0 else
                ConvBlock(in_channels if i == 0 else out_channels, out_channels, residual=residual)
                for i in range(convs_per_stage)]
            stages += [*blocks, *([] if pool_first else [nn.MaxPool2d(2)]), Dropout(dropout)]
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


class TranslateFlipAveraged(nn.Module):
    """Test-time augmentation with more views: half the weight on the image and its mirror image (as
    FlipAveraged), half on the image moved one pixel down-right and one pixel up-left (each with its
    mirror image), the uncovered border filled with the background, as training's random crops fill
    it. Six forward passes per image; the input and output stay the model's."""

    def __init__(self, model: nn.Module, fill: float):
        super().__init__()
        self.model = FlipAveraged(model)
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=self.fill)
        moved = [padded[..., :height, :width], padded[..., 2:, 2:]]  # content shifted down-right, up-left
        log_probs = torch.stack([self.model(x), *(self.model(view) for view in moved)])
        weights = torch.tensor([0.5, 0.25, 0.25], device=x.device, dtype=log_probs.dtype).log()
        return torch.logsumexp(log_probs + weights[:, None, None], dim=0)


def build_model(config: TrainConfig) -> nn.Module:
    if config.model == "mlp":
        return MLP(config.hidden_sizes, dropout=config.dropout, batch_norm=config.batch_norm)
    return CNN(config.cnn_channels, convs_per_stage=config.cnn_convs_per_stage, residual=config.cnn_residual,
               head_width=config.cnn_head_width, dropout=config.dropout, pool_first=config.cnn_pool_first)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
