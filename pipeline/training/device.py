"""Which device to train on, in which precision, and how many CPU threads each worker process may use."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from pipeline.errors import PipelineError


class DeviceError(PipelineError):
    """The device asked for is not a device, or not on this machine."""


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one; ``cpu`` and ``cuda[:N]`` are taken as given, and
    checked: a device this machine does not have is one DeviceError, not a failure mid-training."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested!r} is not a device. Fix: auto (a GPU when there is one), cpu, "
                          f"cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {requested}: this project trains on a CPU or a CUDA GPU only. Fix: auto, "
                          f"cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {requested} was asked for, but torch sees no CUDA GPU on this machine. "
                          f"Fix: --device cpu, or --device auto (the GPU when there is one)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered from 0. Fix: cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or cuda")
    return device


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


def configure_cpu_threads(workers: int = 1) -> int:
    """Give each of ``workers`` processes an equal share of the CPUs (more threads than cores only
    adds contention), and keep freed memory for reuse. OMP_NUM_THREADS, where set, caps the share:
    the usual way to tell a process it shares the machine. Returns the thread count set."""
    threads = max(1, available_cpus() // max(1, workers))
    ceiling = os.environ.get("OMP_NUM_THREADS", "")
    if ceiling.isdigit() and int(ceiling) > 0:
        threads = min(threads, int(ceiling))
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads


# glibc's mallopt parameters (malloc.h) and the value set: a C int each.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_LARGEST_MALLOPT_VALUE = 2**31 - 1


def keep_freed_memory() -> bool:
    """Stop glibc's malloc from handing freed memory back to the kernel; True when it took effect.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed, and gives the
    heap's free top back too. A CNN's activations (200 MB per prediction batch, megabytes per
    training step) are allocated and freed again and again, so every step paid page faults to
    touch fresh pages: 42 % of a CNN run's CPU time went to the kernel, validation took 3.5x longer
    than its arithmetic (docs/results.md). With both thresholds at their maximum, freed memory
    stays in the process for the next allocation; the resident size stays at its peak instead.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no glibc tunables to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc before 2.35 refuses an mmap threshold over 32 MiB: then no block is mapped at all.
    unmapped = mallopt(_M_MMAP_THRESHOLD, _LARGEST_MALLOPT_VALUE) or mallopt(_M_MMAP_MAX, 0)
    untrimmed = mallopt(_M_TRIM_THRESHOLD, _LARGEST_MALLOPT_VALUE)
    return bool(unmapped and untrimmed)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: CUDA GPUs from Ampere on, and CPUs with
    AVX-512 BF16 or AMX, where oneDNN's bfloat16 kernels beat float32 ones. Older GPUs and other
    CPUs emulate it, which is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    return device.type == "cpu" and any(getattr(cpu, check, lambda: False)() for check in checks)


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a config's ``precision`` on ``device`` (float32: no autocast)."""
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return torch.float32
