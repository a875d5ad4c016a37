import subprocess
import sys

import pytest

# A convolution's output at a prediction batch size, made and freed ten times: the page faults (memory
# touched fresh from the kernel) of the last nine rounds. Each round allocates two 100 MB tensors.
FAULTS_WHEN_REALLOCATING = """
import resource, sys, torch
from pipeline.device import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("not glibc")
conv, images = torch.nn.Conv2d(1, 32, 3, padding=1), torch.randn(1024, 1, 28, 28)
with torch.inference_mode():
    conv(images).relu()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        conv(images).relu()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(*modes: str) -> list[int]:
    """The page faults of a process per mode; the processes run side by side (each counts its own)."""
    processes = [subprocess.Popen([sys.executable, "-c", FAULTS_WHEN_REALLOCATING, mode], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for mode in modes]
    counts = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        if "not glibc" in err:
            pytest.skip("this C library has no mallopt thresholds to set")
        assert process.returncode == 0, err
        counts.append(int(out))
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_memory_freed_by_a_large_tensor_is_reused_without_page_faults():
    pages_per_round = 2 * 1024 * 32 * 28 * 28 * 4 // 4096
    default, keep = faults("default", "keep")
    assert default > 8 * pages_per_round  # glibc's default: each round faults its pages in afresh
    assert keep < pages_per_round  # kept: the memory of the first round serves the others
