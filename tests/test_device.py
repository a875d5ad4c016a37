import subprocess
import sys

import pytest

# A convolution's output at a prediction batch size, made and freed ten times: the page faults (memory
# touched fresh from the kernel) of the last nine rounds, first under glibc's defaults, then with freed
# memory kept. Each round allocates two 100 MB tensors. One process measures both (one torch import).
FAULTS_WHEN_REALLOCATING = """
import resource, torch
from pipeline.training.device import keep_freed_memory
conv, images = torch.nn.Conv2d(1, 32, 3, padding=1), torch.randn(1024, 1, 28, 28)

def faults_of_nine_rounds():
    with torch.inference_mode():
        conv(images).relu()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(9):
            conv(images).relu()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_nine_rounds()
print(default, faults_of_nine_rounds() if keep_freed_memory() else "not glibc")
"""


def faults() -> tuple[int, int]:
    """The page faults of nine rounds under glibc's defaults, then with freed memory kept."""
    done = subprocess.run([sys.executable, "-c", FAULTS_WHEN_REALLOCATING], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    default, keep = done.stdout.split()
    if keep == "not glibc":
        pytest.skip("this C library has no mallopt thresholds to set")
    return int(default), int(keep)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_memory_freed_by_a_large_tensor_is_reused_without_page_faults():
    pages_per_round = 2 * 1024 * 32 * 28 * 28 * 4 // 4096
    default, keep = faults()
    assert default > 8 * pages_per_round  # glibc's default: each round faults its pages in afresh
    assert keep < pages_per_round  # kept: the memory of the first round serves the others


def test_worker_processes_share_the_cores_and_omp_num_threads_caps_the_share(monkeypatch):
    import torch

    from pipeline.training import device

    monkeypatch.setattr(device, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert device.configure_cpu_threads(1) == 8 and torch.get_num_threads() == 8
        assert device.configure_cpu_threads(3) == 2  # 8 cores among 3 workers
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user shares the machine with something else
        assert device.configure_cpu_threads(1) == 3 and torch.get_num_threads() == 3
        assert device.configure_cpu_threads(4) == 2  # a share below the cap is kept
    finally:
        torch.set_num_threads(1)
