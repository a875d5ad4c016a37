"""A cache of the decoded dataset and of its splits, so that only the first process pays for them.

Decoding the four gzip'd IDX files through torchvision and splitting them with scikit-learn
cost a process about 5 s before its first training step, mostly importing those two
libraries; every worker, test subprocess and `make` command paid it. What they produce is
saved here as plain NumPy arrays:

- the decoded images and labels, with each decompressed file's SHA-256, under a key that is the
  SHA-256 of the files *as they lie on disk* (hashing 30 MB takes milliseconds; decompressing
  them does not). A changed, truncated or replaced file has another key, so it is never served
  from the cache: it goes through full decoding and verification again;
- the split indices and the training split's pixel statistics, under the dataset checksum and
  the split's settings.

An unreadable or damaged cache entry counts as a miss and is rewritten; a cache folder that
cannot be written is skipped. $FASHION_MNIST_CACHE_DIR moves it (default: data/cache/).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.paths import DATA_DIR

ENV_VAR = "FASHION_MNIST_CACHE_DIR"
FORMAT = 1  # bump when what is stored changes: older entries are then ignored
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DATA_DIR / "cache")


def key_of(paths: Iterable[Path]) -> str:
    """The SHA-256 of the files' bytes, in order (raises OSError when one cannot be read)."""
    combined = hashlib.sha256(f"format {FORMAT}".encode())
    for path in paths:
        combined.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return combined.hexdigest()


def load_decoded(key: str) -> tuple[dict[str, str], tuple[torch.Tensor, ...]] | None:
    """(each file's decompressed SHA-256, the four tensors), or None when not cached."""
    stored = _load(cache_dir() / f"decoded-{key}.npz", ("names", "digests", *ARRAYS))
    if stored is None:
        return None
    digests = dict(zip(stored["names"].tolist(), stored["digests"].tolist()))
    return digests, tuple(torch.from_numpy(stored[name]) for name in ARRAYS)


def save_decoded(key: str, digests: dict[str, str], tensors: tuple[torch.Tensor, ...]) -> None:
    _save(cache_dir() / f"decoded-{key}.npz", names=np.array(list(digests)), digests=np.array(list(digests.values())),
          **{name: tensor.numpy() for name, tensor in zip(ARRAYS, tensors)})


def split_key(checksum: str, **settings) -> str:
    """The name of a split: the dataset's checksum and what decides the split."""
    return "-".join([f"format{FORMAT}", checksum[:20], *(f"{k}{v}" for k, v in sorted(settings.items()))])


def load_split(key: str) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """(training indices, validation indices, pixel mean, pixel std), or None when not cached."""
    stored = _load(cache_dir() / f"split-{key}.npz", ("train_idx", "val_idx", "mean", "std"))
    if stored is None:
        return None
    return stored["train_idx"], stored["val_idx"], float(stored["mean"]), float(stored["std"])


def save_split(key: str, train_idx: np.ndarray, val_idx: np.ndarray, mean: float, std: float) -> None:
    _save(cache_dir() / f"split-{key}.npz", train_idx=train_idx, val_idx=val_idx, mean=np.float64(mean),
          std=np.float64(std))


def _load(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in names}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # absent, or damaged (a full disk, a hand edit): the caller rebuilds and rewrites it


def _save(path: Path, **arrays: np.ndarray) -> None:
    """Written under a temporary name, then renamed: a reader sees the whole entry or none."""
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz",
                                         delete=False) as partial:
            np.savez(partial, **arrays)
        os.chmod(partial.name, 0o644)  # readable by whoever shares the folder (mkstemp makes it 0600)
        os.replace(partial.name, path)
    except OSError:
        # A read-only checkout or a full disk: the next process decodes again, nothing else changes.
        if partial is not None:
            Path(partial.name).unlink(missing_ok=True)
