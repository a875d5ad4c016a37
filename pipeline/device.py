"""Which device to train on, and how many CPU threads each worker process may use."""

from __future__ import annotations

import os

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one; ``cpu`` and ``cuda[:N]`` are taken as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} was asked for, but torch sees no CUDA device")
    return device


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


def configure_cpu_threads(workers: int = 1) -> int:
    """Give each of ``workers`` processes an equal share of the CPUs; more threads than cores only
    adds contention. Returns the thread count set."""
    threads = max(1, available_cpus() // max(1, workers))
    torch.set_num_threads(threads)
    return threads
