"""`make bench-evaluate`: what `make evaluate-best` costs on a champion shaped like the fast-cnn recipe.

The network is the recipe's CNN wrapped in the six-view averaging (the mirror image and one-pixel
shifts) that a CNN champion carries when it validated better, logged and registered as `@champion`
in a throwaway MLflow store, exactly as a session would. Its weights are untrained: the time of a
forward pass does not depend on their values, and this measures time, not accuracy. Then the
command a user runs is timed whole, as a subprocess: `python -m pipeline evaluate-best
--prune-sweep` (what `make evaluate-best` runs) and without the sweep.

Prints figures and asserts nothing; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register_recipe_shaped_champion(recipe: str) -> None:
    import mlflow
    import torch

    from pipeline.data.dataset import load_fashion_mnist, make_splits
    from pipeline.tracking.export import log_raw_pixel_model
    from pipeline.tracking.registry import promote, register
    from pipeline.training.models import TranslateFlipAveraged, build_model
    from pipeline.training.recipes import load_recipe

    config = load_recipe(recipe).config()
    splits = make_splits(load_fashion_mnist(), val_size=config.val_size)
    torch.manual_seed(config.seed)
    champion = TranslateFlipAveraged(build_model(config), splits.background).eval()
    experiment = mlflow.set_experiment("bench-evaluate")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_param("val_size", config.val_size)
    uri = log_raw_pixel_model(run.info.run_id, champion, splits)
    promote(register(uri, run.info.run_id, val_accuracy=0.0, study="bench-evaluate", trial=0))


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fast-cnn")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command; the fastest is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(scratch) / 'mlflow.db'}"}
        os.environ.update(env)
        register_recipe_shaped_champion(args.recipe)
        command = [sys.executable, "-m", "pipeline", "evaluate-best", "--reports-dir", str(Path(scratch) / "reports")]
        print(f"evaluate-best on a champion shaped like recipe {args.recipe} (six views averaged), "
              f"{os.cpu_count()} CPUs; fastest of {args.repeats}:")
        for label, extra in (("with --prune-sweep (make evaluate-best)", ["--prune-sweep"]), ("without the sweep", [])):
            seconds = min(timed(command + extra, env) for _ in range(args.repeats))
            print(f"  {label:<42} {seconds:6.1f} s whole process")


if __name__ == "__main__":
    main()
