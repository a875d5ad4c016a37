"""Find, verify and load Fashion-MNIST; split it; batch and augment it on the device.

The four original IDX files are read through torchvision. Verification is of the
*decompressed* bytes: Debian's .gz files differ from the ones torchvision downloads only in
their gzip headers, so a checksum of the .gz would reject good data.

Every process starts from the data, so the first load also writes what it decoded to a cache
(pipeline/data/cache.py), keyed by the SHA-256 of the files as they lie on disk; the split
indices are cached the same way. Later processes read two arrays and skip decompression,
torchvision's dataset import and scikit-learn's (about 5 s of start-up on a 2-core CPU).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import cache as data_cache
from pipeline.errors import PipelineError
from pipeline.paths import DATA_DIR as REPO_DATA_DIR

DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
ENV_VAR = "FASHION_MNIST_DIR"  # where the official files are, when not in the usual places
CUSTOM_ENV_VAR = "FASHION_MNIST_CUSTOM_DIR"  # a dataset of one's own in the same IDX layout, used knowingly

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# SHA-256 of the decompressed official files (60,000 train / 10,000 test images).
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# torchvision's FashionMNIST.classes, in label order (not imported from there: see the docstring).
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
N_CLASSES = len(CLASSES)
IMAGE_SIDE = 28  # pixels; the images are square and grey
CROP_PADDING = 2  # pixels: `crop-flip` shifts each image by up to this much in each direction
SPLIT_SEED = 0  # the validation split is the same for every run with the same val_size

FIX = (
    "Fix: run `make data` (as root it installs Debian's dataset-fashion-mnist), "
    f"or set {ENV_VAR} to a folder holding the four original *-ubyte.gz files."
)


class DatasetError(PipelineError):
    """The dataset is missing, truncated or corrupt. The message says where and how to fix it."""


@dataclass(frozen=True)
class FashionMNIST:
    """The raw dataset: uint8 images (N, 28, 28) and int64 labels, as published."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path
    checksum: str  # SHA-256 over the four files' SHA-256s: names the exact data a run saw
    custom: bool = False  # True: a user's own IDX files, structure-checked but not the official content

    @property
    def kind(self) -> str:
        """What runs are tagged with: `official` Fashion-MNIST or a `custom` dataset."""
        return "custom" if self.custom else "official"


def search_dirs() -> list[Path]:
    """Where to look: $FASHION_MNIST_DIR alone when it is set (a wrong setting is reported, not skipped);
    otherwise the repo's data/, then Debian's package."""
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    return [REPO_DATA_DIR, DEBIAN_DATA_DIR]


def find_raw_files(directory: Path) -> dict[str, Path] | None:
    """The four files in ``directory`` (flat, or torchvision's FashionMNIST/raw/), each plain or .gz."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        found = {}
        for name in RAW_FILES:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(RAW_FILES):
            return found
    return None


def locate_dataset() -> dict[str, Path]:
    looked = search_dirs()
    for directory in looked:
        files = find_raw_files(directory)
        if files:
            return files
    places = ", ".join(str(d) for d in looked)
    raise DatasetError(f"Fashion-MNIST not found (looked in {places}). {FIX}")


def load_fashion_mnist(directory: Path | None = None, *, custom: bool = False) -> FashionMNIST:
    """Load the official dataset, verified, from ``directory`` or the first place search_dirs() finds
    it; or, with ``custom`` (or $FASHION_MNIST_CUSTOM_DIR set), a dataset of one's own in the same
    IDX layout, whose content is not checked against the official checksums. A custom dataset is
    announced on stderr, so nobody mistakes its figures for Fashion-MNIST's."""
    if directory is None and os.environ.get(CUSTOM_ENV_VAR):
        directory, custom = Path(os.environ[CUSTOM_ENV_VAR]), True
    files = _raw_files(directory, custom=custom)
    source = files[RAW_FILES[0]].parent
    key = data_cache.key_of(files[name] for name in RAW_FILES)
    cached = data_cache.load_decoded(key)
    if cached is not None and _idx_digests(cached[1]) == cached[0]:  # the arrays are what the files held
        digests, tensors = cached
        for name in RAW_FILES:
            _verify(files[name], digests[name], custom=custom)
    else:
        with verified_torchvision_root(directory, custom=custom) as (root, _source, digests):
            tensors = (*_read_split(root, train=True, source=source), *_read_split(root, train=False, source=source))
        data_cache.save_decoded(key, digests, tensors)
    checksum = dataset_checksum(digests)
    if custom:
        print(f"note: using the custom dataset in {source} (checksum {checksum[:12]}), not the official "
              f"Fashion-MNIST; its runs are tagged dataset=custom", file=sys.stderr, flush=True)
    return FashionMNIST(*tensors, source=source, checksum=checksum, custom=custom)


def _idx_digests(tensors: tuple[torch.Tensor, ...]) -> dict[str, str]:
    """The SHA-256 of each IDX file the four arrays were decoded from, computed from the arrays
    (unsigned bytes: magic 0x0803 for images, 0x0801 for labels, big-endian sizes, then the data),
    about 40 ms: a cache entry cannot pass off other data as the official files."""
    digests = {}
    for name, tensor in zip(RAW_FILES, tensors):
        array = tensor.numpy().astype(np.uint8, copy=False)
        header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        digests[name] = hashlib.sha256(header + np.ascontiguousarray(array).tobytes()).hexdigest()
    return digests


def dataset_checksum(digests: dict[str, str]) -> str:
    """SHA-256 over the four decompressed files' SHA-256s: the name of the exact data a run saw."""
    return hashlib.sha256("".join(digests[n] for n in RAW_FILES).encode()).hexdigest()


def _raw_files(directory: Path | None, *, custom: bool = False) -> dict[str, Path]:
    if directory is None:
        return locate_dataset()
    files = find_raw_files(Path(directory))
    if files is None:
        fix = (f"Fix: point {CUSTOM_ENV_VAR} at a folder holding those four files, or unset it to use the official "
               f"Fashion-MNIST." if custom else FIX)
        raise DatasetError(f"{'the custom dataset' if custom else 'Fashion-MNIST'} not found in {directory}: it "
                           f"needs {', '.join(RAW_FILES)} (or their .gz). {fix}")
    return files


def _verify(path: Path, digest: str, *, custom: bool) -> None:
    name = path.name.removesuffix(".gz")
    if not custom and digest != OFFICIAL_SHA256[name]:
        raise DatasetError(
            f"{path} is corrupt or truncated: its content's SHA-256 is {digest[:16]}..., "
            f"expected {OFFICIAL_SHA256[name][:16]}.... {FIX} (A dataset of your own in this layout: "
            f"set {CUSTOM_ENV_VAR} instead.)"
        )


@contextmanager
def verified_torchvision_root(directory: Path | None = None, *, custom: bool = False
                              ) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A scratch folder laid out as torchvision's FashionMNIST expects (FashionMNIST/raw/), holding the
    decompressed files after their content is verified against the official checksums (unless
    ``custom``). Yields (root, source folder, each file's SHA-256)."""
    files = _raw_files(directory, custom=custom)
    source = files[RAW_FILES[0]].parent
    digests = {}
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as scratch:
        raw_dir = Path(scratch) / "FashionMNIST" / "raw"
        raw_dir.mkdir(parents=True)
        for name, path in files.items():
            content = _read_decompressed(path)
            digests[name] = hashlib.sha256(content).hexdigest()
            _verify(path, digests[name], custom=custom)
            (raw_dir / name).write_bytes(content)
        yield scratch, source, digests


def _read_decompressed(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path} cannot be read ({error}): it is truncated or corrupt. {FIX}") from None


def _read_split(root: str, *, train: bool, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST  # 3 s to import: cache misses only

    split = "train" if train else "test"
    try:
        dataset = TorchvisionFashionMNIST(root, train=train, download=False)
    except (AssertionError, RuntimeError, TypeError, ValueError) as error:
        raise DatasetError(f"the {split} files in {source} are not valid IDX files ({error}). {FIX}") from None
    images, labels = dataset.data, dataset.targets
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) != len(labels):
        raise DatasetError(f"the {split} files in {source} hold {tuple(images.shape)} images for "
                           f"{len(labels)} labels; expected (N, 28, 28) and N labels. {FIX}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= N_CLASSES:
        raise DatasetError(f"the {split} labels in {source} are not all in 0..9. {FIX}")
    return images, labels


# --- Splits and batches ------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    """Normalized float images (N, 1, 28, 28) and labels for training and validation.

    ``mean`` and ``std`` are the training split's pixel statistics (pixels scaled to [0, 1]);
    a model exported for outside use carries them to normalize raw pixels itself.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: float
    std: float
    # Which images each side holds, as digests of the dataset's checksum and the split's indices: the
    # same for two runs only when they saw the same images ("" for a dataset built in memory).
    train_digest: str = ""
    val_digest: str = ""

    def to(self, device: torch.device | str) -> Splits:
        # Tensor.to returns the tensor itself when it is already there: calling this per trial is free.
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("train_images", "train_labels", "val_images", "val_labels")})

    @property
    def background(self) -> float:
        """The normalized value of a black (0) pixel: what padding must use."""
        return -self.mean / self.std


@dataclass(frozen=True)
class DataSeen:
    """What a run saw of the dataset in one context (training, validation, test), for its lineage:
    experiments.dataset_input turns it into an MLflow dataset input."""

    context: str
    images: int
    digest: str
    cut: str  # how this part was taken from the dataset's files, in words


def data_seen(dataset: FashionMNIST, splits: Splits, *, val_size: int, train_subset: int = 0) -> list[DataSeen]:
    """The training and validation splits a trial saw."""
    cut = f"stratified, seed {SPLIT_SEED}, val_size {val_size}"
    if train_subset:
        cut += f", train_subset {train_subset}"
    total = len(dataset.train_labels)
    return [DataSeen("training", len(splits.train_labels), splits.train_digest,
                     f"train: {total} training images less validation ({cut})"),
            DataSeen("validation", len(splits.val_labels), splits.val_digest, f"validation: of {total} training "
                                                                                 f"images ({cut})")]


def test_seen(dataset: FashionMNIST) -> DataSeen:
    """The test split an evaluation saw: all of it."""
    images = len(dataset.test_labels)
    return DataSeen("test", images, _digest(dataset.checksum, "test"), f"test: the {images} test images")


def _digest(checksum: str, part: str, indices: np.ndarray | None = None) -> str:
    content = hashlib.sha256(f"{checksum}:{part}:".encode())
    if indices is not None:
        content.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    return content.hexdigest()[:16]


def make_splits(dataset: FashionMNIST, *, val_size: int, train_subset: int = 0) -> Splits:
    """Stratified validation split out of the training images; optional stratified training subset."""
    if val_size >= len(dataset.train_labels):
        raise DatasetError(f"val_size={val_size} leaves no training images out of {len(dataset.train_labels)}. "
                           f"Fix: a smaller val_size (the default is {10_000})")
    if 0 < train_subset < N_CLASSES or val_size < N_CLASSES:
        raise DatasetError(f"train_subset={train_subset}, val_size={val_size}: a stratified split needs at least "
                           f"{N_CLASSES} images on each side (one per class). Fix: train_subset=0 (all) or >= "
                           f"{N_CLASSES}, val_size >= {N_CLASSES}")
    # A dataset built in memory has no checksum to name its split by: it is split afresh each time.
    key = dataset.checksum and data_cache.split_key(dataset.checksum, val=val_size, subset=train_subset,
                                                    seed=SPLIT_SEED)
    cached = data_cache.load_split(key) if key else None
    if cached is None:
        cached = _stratified_split(dataset.train_labels.numpy(), val_size=val_size, train_subset=train_subset,
                                   images=dataset.train_images)
        if key:
            data_cache.save_split(key, *cached)
    train_idx, val_idx, mean, std = cached
    return Splits(
        train_images=normalize(dataset.train_images[train_idx], mean, std),
        train_labels=dataset.train_labels[train_idx],
        val_images=normalize(dataset.train_images[val_idx], mean, std),
        val_labels=dataset.train_labels[val_idx],
        mean=mean,
        std=std,
        train_digest=_digest(dataset.checksum, "train", train_idx) if dataset.checksum else "",
        val_digest=_digest(dataset.checksum, "validation", val_idx) if dataset.checksum else "",
    )


def _stratified_split(labels: np.ndarray, *, val_size: int, train_subset: int, images: torch.Tensor
                      ) -> tuple[np.ndarray, np.ndarray, float, float]:
    from sklearn.model_selection import train_test_split  # 2 s to import: cache misses only

    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_size, stratify=labels, random_state=SPLIT_SEED
    )
    # The statistics of the whole training split, also when training on a subset of it.
    train_pixels = images[train_idx].float().div_(255)
    mean, std = train_pixels.mean().item(), train_pixels.std().item()
    if 0 < train_subset < len(train_idx):
        train_idx = train_test_split(train_idx, train_size=train_subset, stratify=labels[train_idx],
                                     random_state=SPLIT_SEED)[0]
    return train_idx, val_idx, mean, std


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardized with the training statistics."""
    return ((images.float() / 255 - mean) / std).unsqueeze(1)


def shuffled_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of a random permutation, made on the data's device. A final batch of one image is
    dropped: batch norm cannot train on it."""
    order = torch.randperm(len(labels), device=labels.device, generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        if len(index) > 1:
            yield images.index_select(0, index), labels.index_select(0, index)  # 2x faster than [index] on CPU


def augment(images: torch.Tensor, generator: torch.Generator, *, fill: float, crop: bool) -> torch.Tensor:
    """A random horizontal flip and, when ``crop``, a random crop of the image padded by CROP_PADDING
    pixels of ``fill``: each image of the batch gets its own shift and flip, drawn from ``generator``
    on the batch's device, in a handful of whole-batch tensor operations."""
    n, side = images.shape[0], images.shape[-1]
    device = images.device
    if crop:
        pad = CROP_PADDING
        padded = F.pad(images, (pad, pad, pad, pad), value=fill)
        shift_y = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
        shift_x = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
        span = torch.arange(side, device=device)
        rows = (shift_y + span)[:, None, :, None]  # (n, 1, side, 1)
        cols = (shift_x + span)[:, None, None, :]  # (n, 1, 1, side)
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
