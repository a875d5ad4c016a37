"""`make bench`: the shared trainer against the notebook's loop, then time to the notebook's test accuracy.

1. Throughput at batch 64, same MLP (784-512-256-128-10, dropout 0.2), same optimizer (Adam, lr 1e-3),
   in three rounds over a third of the 50,000 training images each, the loops back to back within a
   round so that a slow spell of a shared machine hits both; the medians are the figures:
   - the notebook's way: torchvision's FashionMNIST Dataset with per-image ToTensor + Normalize,
     a shuffling DataLoader, and `.item()` after every step;
   - the project's trainer: tensors on the device, batches sliced from a permutation;
   - a bare loop over the same tensors (forward, backward, step; no metrics, nothing else): the
     ceiling of this hardware for this model and optimizer, whatever a trainer does;
   then where the bare loop's step goes, timed by leaving one part out at a time (the profiler is
   no guide here: on a small VM it inflates MKL's calls about twofold).
2. Whole processes, start-up included, 2 epochs at batch 64 of the same MLP and optimizer: the
   notebook's way as a script (benchmarks/notebook_script.py) against `python -m pipeline train`.
3. Time to accuracy: `python -m pipeline train`'s default configuration, from the command to the
   first epoch whose model reaches the notebook's 90.30 % test accuracy (benchmarks/time_to_accuracy.py),
   and the process's start-up before its first training step.
4. The CNN's epoch: seconds per epoch of the cnn study's former default network (32-64 channels,
   one conv a stage, crop-flip) from a 2-epoch `train`.
5. The fast-cnn recipe: `make train RECIPE=fast-cnn` as one process: its wall time, its validation
   and test accuracy, whether that reaches 94.0 % test (the recipe has a fixed schedule: its time to
   94.0 % is the whole run's), and the share of its CPU time spent in the kernel.
(Part 6, MLflow's cost, is benchmarks/bench_tracking.py.)

Prints figures and asserts nothing; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from notebook_script import notebook_epoch  # beside this file
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

from pipeline.training.config import NOTEBOOK_TEST_ACCURACY, TrainConfig
from pipeline.data.dataset import load_fashion_mnist, make_splits, verified_torchvision_root
from pipeline.training.device import configure_cpu_threads, pick_device
from pipeline.training.models import MLP
from pipeline.training.train import train

# The notebook's model and optimisation, so all loops do the same work per step.
NOTEBOOK_DROPOUT = 0.2
NOTEBOOK_LIKE = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="none", label_smoothing=0.0, precision="float32",
                     dropout=NOTEBOOK_DROPOUT, epochs=1)
ROUNDS = 3
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def notebook_dataset(mean: float, std: float) -> TorchvisionFashionMNIST:
    with verified_torchvision_root() as (root, _source, _checksum):
        return TorchvisionFashionMNIST(
            root, train=True, transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
        )


def notebook_samples_per_second(dataset: TorchvisionFashionMNIST, indices: range, batch_size: int) -> float:
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=True)
    torch.manual_seed(0)
    model = MLP(dropout=NOTEBOOK_DROPOUT)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    _loss, _accuracy, seen = notebook_epoch(model, optimizer, loader)
    return seen / (time.perf_counter() - started)


def bare_loop_samples_per_second(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    torch.manual_seed(0)
    images, labels = images.to(device), labels.to(device)
    model = MLP(dropout=NOTEBOOK_DROPOUT).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()
    order = torch.randperm(len(labels), device=device)
    started = time.perf_counter()
    for start in range(0, len(order) - 1, batch_size):
        index = order[start:start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(model(images[index]), labels[index]).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(labels) / (time.perf_counter() - started)


def _ms_per_call(step, repeats: int, device) -> float:
    for _ in range(repeats // 10):  # warm-up: allocations, optimizer state
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e3


def step_breakdown(batch_size: int, device, repeats: int = 300) -> None:
    """Milliseconds of one bare training step, and what each part costs: the step without it."""
    torch.manual_seed(0)
    images = torch.randn(batch_size, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step_ms(*, dropout=NOTEBOOK_DROPOUT, batch_norm=True, optimizer_step=True) -> float:
        model = MLP(dropout=dropout, batch_norm=batch_norm).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.nll_loss(model(images), labels).backward()
            if optimizer_step:
                optimizer.step()
        return _ms_per_call(step, repeats, device)

    # The step's matrix products alone: each layer's forward and weight gradient, and the input
    # gradient of every layer but the first (the images need none).
    linears = [m for m in MLP() if isinstance(m, nn.Linear)]
    products, flops = [], 0
    for i, layer in enumerate(linears):
        x = torch.randn(batch_size, layer.in_features, device=device)
        w = torch.randn(layer.out_features, layer.in_features, device=device)
        grad = torch.randn(batch_size, layer.out_features, device=device)
        products += [lambda x=x, w=w: x @ w.t(), lambda x=x, grad=grad: grad.t() @ x]
        flops += 2 * 2 * x.shape[0] * w.numel()
        if i > 0:
            products.append(lambda w=w, grad=grad: grad @ w)
            flops += 2 * x.shape[0] * w.numel()
    matmul = _ms_per_call(lambda: [product() for product in products], repeats, device)

    full = step_ms()
    print(f"   bare step {full:.2f} ms: matrix products {matmul:.2f} ms ({flops / matmul / 1e6:.0f} GFLOP/s), "
          f"Adam {full - step_ms(optimizer_step=False):.2f} ms, dropout {full - step_ms(dropout=0.0):.2f} ms, "
          f"batch norm {full - step_ms(batch_norm=False):.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="batch size of parts 1 and 2 (default: 64, the notebook's)")
    parser.add_argument("--device", default="auto",
                        help="device of part 1: auto, cpu, cuda (default: auto); parts 4 and 5 run only on a CPU")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the throughput comparison")
    args = parser.parse_args()

    device = pick_device(args.device)
    threads = configure_cpu_threads()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"hardware: {platform.processor() or platform.machine()}, {threads} CPU threads{gpu}; "
          f"torch {torch.__version__}; device {device}")

    dataset = load_fashion_mnist()
    splits = make_splits(dataset, val_size=10_000)
    n_train = len(splits.train_labels)

    print(f"\n1. training throughput, batch {args.batch_size}, {ROUNDS} rounds of {n_train // ROUNDS:,} images",
          flush=True)
    dataset_for_notebook = notebook_dataset(splits.mean, splits.std)
    config = TrainConfig(batch_size=args.batch_size, **NOTEBOOK_LIKE)
    rounds = []
    for chunk in (range(i * n_train // ROUNDS, (i + 1) * n_train // ROUNDS) for i in range(ROUNDS)):
        notebook = notebook_samples_per_second(dataset_for_notebook, chunk, args.batch_size)
        images, labels = splits.train_images[chunk.start:chunk.stop], splits.train_labels[chunk.start:chunk.stop]
        epoch = train(config, replace(splits, train_images=images, train_labels=labels), device=device).history[0]
        trainer = len(chunk) / epoch.train_seconds
        bare = bare_loop_samples_per_second(images, labels, args.batch_size, device)
        rounds.append((notebook, trainer, bare))
        print(f"   round {len(rounds)}: notebook {notebook:6,.0f}, trainer {trainer:6,.0f} ({trainer / notebook:.2f} x), "
              f"bare loop {bare:6,.0f} ({bare / notebook:.2f} x) samples/s", flush=True)
    notebook, trainer, bare = (statistics.median(column) for column in zip(*rounds))
    speedup = statistics.median(t / n for n, t, _ in rounds)
    ceiling = statistics.median(b / n for n, _, b in rounds)
    print(f"   notebook loop (Dataset + DataLoader, CPU)  {notebook:9,.0f} samples/s")
    print(f"   project trainer ({device})                {trainer:9,.0f} samples/s")
    print(f"   speed-up                                   {speedup:9.2f} x")
    print(f"   bare loop, same tensors (the ceiling)      {bare:9,.0f} samples/s = {ceiling:.2f} x")
    step_breakdown(args.batch_size, device)

    if args.skip_accuracy:
        return
    whole_process_comparison(args.batch_size)
    time_to_notebook_accuracy()
    if device.type == "cpu":  # the recipe and its figures are sized for a CPU
        cnn_epoch_seconds()
        fast_cnn_recipe()


NOTEBOOK_LIKE_SETTINGS = ["--set", "optimizer=adam", "--set", "lr=0.001", "--set", "weight_decay=0", "--set",
                          "schedule=none", "--set", "label_smoothing=0", "--set", f"dropout={NOTEBOOK_DROPOUT}"]


def _wall_seconds(command: list[str]) -> float:
    started = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO_ROOT)
    return time.time() - started


def whole_process_comparison(batch_size: int, epochs: int = 2) -> None:
    print(f"\n2. whole processes, start-up included: {epochs} epochs at batch {batch_size}, the same MLP and "
          f"Adam, {ROUNDS} rounds; the project in float32 (like for like) and in its default precision", flush=True)
    notebook = [sys.executable, str(BENCH_DIR / "notebook_script.py"), str(epochs), str(batch_size)]
    project = [sys.executable, "-m", "pipeline", "train", "--epochs", str(epochs), "--set", f"batch_size={batch_size}",
               *NOTEBOOK_LIKE_SETTINGS]
    rounds = []
    for i in range(ROUNDS):
        rounds.append((_wall_seconds(notebook), _wall_seconds([*project, "--set", "precision=float32"]),
                       _wall_seconds(project)))
        print(f"   round {i + 1}: notebook script {rounds[-1][0]:5.1f} s, python -m pipeline train "
              f"{rounds[-1][1]:5.1f} s (float32), {rounds[-1][2]:5.1f} s (precision auto)", flush=True)
    notebook_s, float32_s, auto_s = (statistics.median(column) for column in zip(*rounds))
    print(f"   median: notebook script {notebook_s:.1f} s; python -m pipeline train {float32_s:.1f} s in float32 "
          f"({notebook_s / float32_s:.2f} x), {auto_s:.1f} s in its default precision ({notebook_s / auto_s:.2f} x)")


def time_to_notebook_accuracy() -> None:
    config = TrainConfig()
    print(f"\n3. time to the notebook's {NOTEBOOK_TEST_ACCURACY:.2%} test accuracy: python -m pipeline train "
          f"(batch {config.batch_size}, {config.optimizer}, {config.schedule}, {config.epochs} epochs, "
          f"precision {config.precision})", flush=True)
    launched = time.time()
    done = subprocess.run([sys.executable, str(BENCH_DIR / "time_to_accuracy.py"), repr(launched)], check=True,
                          capture_output=True, text=True, cwd=REPO_ROOT)
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"   start-up before the first training step: {result['startup_seconds']:.1f} s")
    print("   test accuracy by epoch: " + ", ".join(f"{e['epoch']}: {e['test_accuracy']:.2%}" for e in result["epochs"]))
    reached = result["reached"]
    if reached:
        print(f"   reached {reached['test_accuracy']:.2%} at epoch {reached['epoch']} of {result['config_epochs']}: "
              f"{reached['seconds']:.1f} s from the command")
    else:
        print(f"   not reached in {result['config_epochs']} epochs")


# The cnn study's default network before recipes/fast-cnn.toml: the yardstick for epoch times.
FORMER_CNN_DEFAULT = ["--model", "cnn", "--set", "cnn_channels=32,64", "--set", "cnn_convs_per_stage=1", "--set",
                      "cnn_head_width=128", "--set", "augment=crop-flip", "--set", "lr=0.003"]
RECIPE = "fast-cnn"
RECIPE_TARGET_TEST_ACCURACY = 0.94


def _train_json(arguments: list[str]) -> tuple[dict, float, dict[str, float]]:
    """`python -m pipeline train --json ...` as a subprocess: its report, wall seconds and CPU usage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--json", *arguments], check=True,
                          capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {field: getattr(after, field) - getattr(before, field) for field in ("ru_utime", "ru_stime", "ru_minflt")}
    return json.loads(done.stdout.splitlines()[-1]), seconds, usage


def cnn_epoch_seconds() -> None:
    print("\n4. the CNN: the cnn study's former default network (32-64 channels, one conv a stage, crop-flip), "
          "2 epochs", flush=True)
    report, _, _ = _train_json(["--epochs", "2", *FORMER_CNN_DEFAULT])
    epochs = report["history"]
    print("   seconds per epoch (steps + validation): " + ", ".join(f"{e['epoch_seconds']:.1f}" for e in epochs) +
          f"; steps alone {statistics.mean(e['train_seconds'] for e in epochs):.1f} s")


def fast_cnn_recipe() -> None:
    print(f"\n5. python -m pipeline train --recipe {RECIPE}: one process, start-up and final evaluation included",
          flush=True)
    report, seconds, usage = _train_json(["--recipe", RECIPE])
    cpu = usage["ru_utime"] + usage["ru_stime"]
    print(f"   {report['epochs']} epochs; validation {report['val_accuracy']:.2%} (test-time augmentation: "
          f"{report['tta']}), test {report['test_accuracy']:.2%}")
    print(f"   wall {seconds:.0f} s; CPU {cpu:.0f} s of which kernel {usage['ru_stime']:.1f} s "
          f"({usage['ru_stime'] / cpu:.1%}); {usage['ru_minflt']:,} minor page faults")
    if report["test_accuracy"] >= RECIPE_TARGET_TEST_ACCURACY:
        print(f"   reached {RECIPE_TARGET_TEST_ACCURACY:.1%} test: {seconds:.0f} s from the command")
    else:
        print(f"   {RECIPE_TARGET_TEST_ACCURACY:.1%} test not reached: {report['test_accuracy']:.2%} "
              f"after {seconds:.0f} s")


if __name__ == "__main__":
    main()
