"""`python -m pipeline train`'s default configuration, timed from process start to the first epoch
whose model reaches the notebook's test accuracy. `make bench` runs it as a subprocess and passes
the wall-clock time at which it launched it, so interpreter start-up and imports count.

After every epoch the current weights are scored on the test split, only to report (as `make
train` does at the end); the seconds those checks take are left out of the figure.
Usage: time_to_accuracy.py LAUNCHED_AT [--set KEY=VALUE ...]  (prints one JSON line)
"""

import json
import sys
import time

launched_at = float(sys.argv[1])

from pipeline.commands import parse_overrides  # noqa: E402  (imports are part of what is timed)
from pipeline.training.config import NOTEBOOK_TEST_ACCURACY, TrainConfig  # noqa: E402
from pipeline.data.dataset import load_fashion_mnist, make_splits, normalize  # noqa: E402
from pipeline.training.device import configure_cpu_threads, pick_device  # noqa: E402
from pipeline.training.models import build_model  # noqa: E402
from pipeline.training.train import nll_and_accuracy, train  # noqa: E402


class Reached(Exception):
    """Stops training at the first epoch that reaches the notebook's test accuracy."""


config = TrainConfig().replace(**parse_overrides(sys.argv[3::2]))
device = pick_device()
configure_cpu_threads()
dataset = load_fashion_mnist()
splits = make_splits(dataset, val_size=config.val_size).to(device)
test_images, test_labels = normalize(dataset.test_images, splits.mean, splits.std).to(device), dataset.test_labels
first_step_at = time.time()
scorer = build_model(config).to(device)  # a copy of each epoch's weights is scored here
checking = 0.0  # seconds spent scoring, left out of the times reported
epochs = []


def score(state: dict) -> None:
    global checking
    epoch_end = time.time()
    scorer.load_state_dict(state["model"])
    _, accuracy = nll_and_accuracy(scorer, test_images, test_labels)
    epochs.append({"epoch": state["epoch"], "test_accuracy": accuracy, "seconds": epoch_end - launched_at - checking})
    checking += time.time() - epoch_end
    if accuracy >= NOTEBOOK_TEST_ACCURACY:
        raise Reached


try:
    train(config, splits, device=device, on_checkpoint=score)
except Reached:
    pass
reached = epochs[-1] if epochs and epochs[-1]["test_accuracy"] >= NOTEBOOK_TEST_ACCURACY else None
print(json.dumps({"startup_seconds": first_step_at - launched_at, "reached": reached, "epochs": epochs,
                  "config_epochs": config.epochs}))
