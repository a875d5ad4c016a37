"""`make data`: make Fashion-MNIST available on this machine, then verify it.

In order of preference: Debian's dataset-fashion-mnist installed with apt (as root); the same
package unpacked into the repo's data/ with `apt-get download` + `dpkg -x` (no root needed);
torchvision's download into data/ (needs internet).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.data.dataset import DEBIAN_DATA_DIR, REPO_DATA_DIR, DatasetError, FashionMNIST, load_fashion_mnist

DEBIAN_PACKAGE = "dataset-fashion-mnist"


def ensure_dataset(log=print) -> FashionMNIST:
    """Load the dataset; if it is missing or damaged, obtain it once and load again."""
    try:
        return load_fashion_mnist()
    except DatasetError as problem:
        log(f"{problem}\nObtaining Fashion-MNIST ...")
    errors = []
    for method in (_apt_install, _apt_download_into_repo, _torchvision_download_into_repo):
        try:
            method(log)
            return load_fashion_mnist()
        except (DatasetError, OSError, RuntimeError, subprocess.CalledProcessError) as error:
            errors.append(f"  {method.__doc__}: {error}")
    raise DatasetError("could not obtain Fashion-MNIST:\n" + "\n".join(errors) +
                       f"\nInstall Debian's {DEBIAN_PACKAGE} by hand, or put the four *-ubyte.gz files "
                       f"in {REPO_DATA_DIR}.")


def _apt_install(log) -> None:
    """apt-get install (root)"""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("needs root and apt-get")
    command = ["apt-get", "install", "-y", "-q", "--reinstall", DEBIAN_PACKAGE]
    log("$ " + " ".join(command))
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    if not DEBIAN_DATA_DIR.is_dir():
        raise RuntimeError(f"the package installed, but {DEBIAN_DATA_DIR} is missing")


def _apt_download_into_repo(log) -> None:
    """apt-get download + dpkg -x into data/"""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError("needs apt-get and dpkg")
    with tempfile.TemporaryDirectory() as scratch:
        log(f"$ apt-get download {DEBIAN_PACKAGE} && dpkg -x ...")
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=scratch, check=True,
                       stdout=subprocess.DEVNULL)
        (deb,) = Path(scratch).glob("*.deb")
        unpacked = Path(scratch) / "root"
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
        REPO_DATA_DIR.mkdir(exist_ok=True)
        for gz in (unpacked / DEBIAN_DATA_DIR.relative_to("/")).glob("*-ubyte.gz"):
            shutil.copy2(gz, REPO_DATA_DIR / gz.name)


def _torchvision_download_into_repo(log) -> None:
    """torchvision download into data/"""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    log(f"Downloading with torchvision into {REPO_DATA_DIR} ...")
    for train in (True, False):
        TorchvisionFashionMNIST(REPO_DATA_DIR, train=train, download=True)
