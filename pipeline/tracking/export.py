"""The model as clients get it: raw pixels in, class probabilities out, logged with MLflow.

A client needs nothing from this project: the exported module carries the training split's
normalization, and plain MLflow loads it (``mlflow.pyfunc.load_model``).
"""

from __future__ import annotations

import copy
from importlib.metadata import version

import numpy as np
import torch
from torch import nn

from pipeline.data.dataset import Splits


class RawPixelClassifier(nn.Module):
    """Raw pixels 0-255, float32 (N, 28, 28) in; class probabilities (N, 10) out."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        normalized = (pixels / 255.0 - self.mean) / self.std
        return self.model(normalized.unsqueeze(1)).exp()


def log_raw_pixel_model(run_id: str, model: nn.Module, splits: Splits) -> str:
    """Log ``model`` (trained on ``splits``) to the run as `model`, in eval mode on the CPU, with a
    signature and four validation images as the input example. Returns the model's URI."""
    import mlflow
    from mlflow.models import infer_signature

    # A copy in the default memory format: a CNN trains in channels-last, which clients need not know.
    network = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    wrapped = RawPixelClassifier(network, splits.mean, splits.std).eval()
    example = (splits.val_images[:4, 0].cpu() * splits.std + splits.mean).mul(255).round().numpy().astype(np.float32)
    with torch.inference_mode():
        output = wrapped(torch.from_numpy(example)).numpy()
    with mlflow.start_run(run_id=run_id):  # log_model writes to the active run
        info = mlflow.pytorch.log_model(
            wrapped, name="model", input_example=example, signature=infer_signature(example, output),
            # Explicit requirements: inferring them costs 10-16 s a call.
            pip_requirements=[f"torch=={version('torch').split('+')[0]}", f"mlflow=={version('mlflow')}",
                              f"numpy=={version('numpy')}"],
        )
    return info.model_uri
