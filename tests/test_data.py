import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.data import dataset as data

from pipeline.data import cache as data_cache
from pipeline.data.dataset import (
    DatasetError,
    FashionMNIST,
    augment,
    load_fashion_mnist,
    make_splits,
    normalize,
    shuffled_batches,
)
from tests.conftest import PER_CLASS_TEST, PER_CLASS_TRAIN, write_dataset


def test_loads_a_custom_dataset_in_the_idx_layout(synthetic_dataset):
    assert synthetic_dataset.train_images.shape == (10 * PER_CLASS_TRAIN, 28, 28)
    assert synthetic_dataset.train_images.dtype == torch.uint8
    assert torch.bincount(synthetic_dataset.train_labels).tolist() == [PER_CLASS_TRAIN] * 10
    assert torch.bincount(synthetic_dataset.test_labels).tolist() == [PER_CLASS_TEST] * 10
    assert len(synthetic_dataset.checksum) == 64 and synthetic_dataset.kind == "custom"


def test_plain_and_gzipped_files_load_to_the_same_data(tmp_path, synthetic_dataset):
    plain = load_fashion_mnist(write_dataset(tmp_path / "plain", compress=False), custom=True)
    assert torch.equal(plain.train_images, synthetic_dataset.train_images)
    assert plain.checksum == synthetic_dataset.checksum


def test_files_other_than_the_official_ones_are_refused_and_the_fix_is_named(tmp_path):
    folder = write_dataset(tmp_path / "unofficial")
    with pytest.raises(DatasetError, match=f"corrupt or truncated.*make data.*{data.CUSTOM_ENV_VAR}"):
        load_fashion_mnist(folder)


def test_a_stray_checksum_file_does_not_make_other_data_official(tmp_path):
    # A SHA256SUMS beside the files once made the loader trust whatever it listed.
    folder = write_dataset(tmp_path / "with-manifest", compress=False)
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                                               for n in data.RAW_FILES))
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_fashion_mnist(folder)


def test_a_custom_dataset_is_named_by_the_user_and_announced(tmp_path, monkeypatch, synthetic_dir, capsys):
    monkeypatch.setenv(data.CUSTOM_ENV_VAR, str(synthetic_dir))
    dataset = load_fashion_mnist()
    assert dataset.custom and dataset.source == synthetic_dir
    assert "custom dataset" in capsys.readouterr().err


def test_a_truncated_gzip_file_gives_a_clear_error(tmp_path):
    folder = write_dataset(tmp_path / "truncated")
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-300])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz cannot be read.*truncated"):
        load_fashion_mnist(folder, custom=True)


def test_a_file_shorter_than_its_header_says_is_rejected(tmp_path):
    # A custom dataset has no checksums to catch it: the IDX structure does.
    folder = write_dataset(tmp_path / "short", compress=False)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-28 * 28])
    with pytest.raises(DatasetError, match="test files .* are not valid IDX files"):
        load_fashion_mnist(folder, custom=True)


def test_a_missing_dataset_names_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.delenv(data.CUSTOM_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "REPO_DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", tmp_path / "usr-share")
    with pytest.raises(DatasetError) as raised:
        load_fashion_mnist()
    message = str(raised.value)
    assert str(tmp_path / "data") in message and str(tmp_path / "usr-share") in message
    assert "make data" in message


def test_the_environment_variable_is_used_alone(tmp_path, monkeypatch):
    if not data.find_raw_files(data.DEBIAN_DATA_DIR):
        pytest.skip("needs the real dataset in its usual place (make data)")
    monkeypatch.delenv(data.CUSTOM_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "REPO_DATA_DIR", data.DEBIAN_DATA_DIR)  # data that would load, if looked for
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="nowhere"):
        load_fashion_mnist()


def indexed_dataset(n_per_class=50) -> FashionMNIST:
    """Images whose first two pixels spell their index, so splits can be checked for overlap."""
    n = 10 * n_per_class
    labels = torch.arange(n) % 10
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0] = torch.arange(n) // 256
    images[:, 0, 1] = torch.arange(n) % 256
    return FashionMNIST(images, labels, images[:10], labels[:10], source=None, checksum="")


def image_ids(normalized: torch.Tensor, mean: float, std: float) -> list[int]:
    pixels = torch.round((normalized[:, 0, 0, :2] * std + mean) * 255).long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def test_validation_split_is_stratified_disjoint_and_seeded():
    dataset = indexed_dataset()
    splits = make_splits(dataset, val_size=100)
    assert torch.bincount(splits.val_labels).tolist() == [10] * 10
    train_ids = set(image_ids(splits.train_images, splits.mean, splits.std))
    val_ids = set(image_ids(splits.val_images, splits.mean, splits.std))
    assert len(train_ids) == 400 and len(val_ids) == 100
    assert train_ids.isdisjoint(val_ids)
    again = make_splits(dataset, val_size=100)
    assert torch.equal(again.val_images, splits.val_images)


def test_training_subset_is_stratified_and_leaves_validation_alone():
    dataset = indexed_dataset()
    full = make_splits(dataset, val_size=100)
    subset = make_splits(dataset, val_size=100, train_subset=200)
    assert torch.bincount(subset.train_labels).tolist() == [20] * 10
    assert torch.equal(subset.val_images, full.val_images)


def test_normalization_uses_the_training_split_statistics():
    dataset = indexed_dataset()
    splits = make_splits(dataset, val_size=100)
    train_ids = image_ids(splits.train_images, splits.mean, splits.std)
    train_pixels = dataset.train_images[train_ids].float() / 255
    assert splits.mean == pytest.approx(train_pixels.mean().item(), rel=1e-5)
    assert splits.std == pytest.approx(train_pixels.std().item(), rel=1e-5)
    assert splits.train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert splits.train_images.std().item() == pytest.approx(1.0, abs=1e-4)
    # Validation images are standardized with the training statistics, not their own.
    val_ids = image_ids(splits.val_images, splits.mean, splits.std)
    expected = normalize(dataset.train_images[val_ids], splits.mean, splits.std)
    assert torch.allclose(splits.val_images, expected, atol=1e-5)
    assert splits.val_images.mean().item() != pytest.approx(0.0, abs=1e-7)


def test_shuffled_batches_visit_every_image_once():
    images = torch.arange(100).float().view(100, 1, 1, 1)
    labels = torch.arange(100)
    batches = list(shuffled_batches(images, labels, 32, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(100))
    assert seen.tolist() != list(range(100))  # shuffled
    assert all(torch.equal(x.view(-1), y.float()) for x, y in batches)  # images stay with their labels


def test_augmentation_shifts_and_flips_each_image_within_the_padding():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=generator)
    out = augment(images, generator, fill=-1.0, crop=True)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    shifts = []
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   for c in (padded[i, :, dy:dy + 28, dx:dx + 28], padded[i, :, dy:dy + 28, dx:dx + 28].flip(-1))
                   if torch.equal(out[i], c)]
        assert matches, f"image {i} is not a shift/flip of itself"
        shifts.append(matches[0])
    assert len(set(shifts)) > 10  # each image its own shift, most of them real ones (2, 2 is none)


def test_flip_only_augmentation_keeps_every_pixel_row():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(32, 1, 28, 28, generator=generator)
    out = augment(images, generator, fill=0.0, crop=False)
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(out[i], images[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32


# --- The decoded-dataset cache (pipeline/data/cache.py) -------------------------------------------

def _load_in_a_fresh_process(folder, env) -> dict:
    """Load and split in a new interpreter, as every command and worker does; report what it imported."""
    script = (
        "import json, sys\n"
        "from pipeline.data.dataset import load_fashion_mnist, make_splits\n"
        f"dataset = load_fashion_mnist({str(folder)!r}, custom=True)\n"
        "splits = make_splits(dataset, val_size=200, train_subset=300)\n"
        "print(json.dumps({'checksum': dataset.checksum, 'mean': splits.mean, 'train_labels': splits.train_labels.tolist(),\n"
        "                  'val_pixels': splits.val_images.sum().item(),\n"
        "                  'imported': sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_gets_the_same_data_and_split_without_decoding_again(tmp_path, synthetic_dir):
    env = {**os.environ, data_cache.ENV_VAR: str(tmp_path / "cache")}
    first = _load_in_a_fresh_process(synthetic_dir, env)
    second = _load_in_a_fresh_process(synthetic_dir, env)
    assert first["imported"] == ["sklearn", "torchvision"]  # decoded and split the slow way, once
    assert second["imported"] == []  # start-up: neither library is imported when the cache serves
    assert {k: v for k, v in second.items() if k != "imported"} == {k: v for k, v in first.items() if k != "imported"}


def test_a_file_changed_after_caching_is_read_again_not_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.ENV_VAR, str(tmp_path / "cache"))
    folder = write_dataset(tmp_path / "data", compress=False)
    load_fashion_mnist(folder, custom=True)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-28 * 28])
    with pytest.raises(DatasetError, match="not valid IDX files"):
        load_fashion_mnist(folder, custom=True)


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, synthetic_dir, synthetic_dataset):
    monkeypatch.setenv(data_cache.ENV_VAR, str(tmp_path / "cache"))
    load_fashion_mnist(synthetic_dir, custom=True)
    computed = make_splits(synthetic_dataset, val_size=200).val_labels  # made, then cached
    entries = sorted((tmp_path / "cache").glob("*.npz"))
    assert [e.name.split("-")[0] for e in entries] == ["decoded", "split"]
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:1000])  # a writer killed half-way, say
    again = load_fashion_mnist(synthetic_dir, custom=True)
    assert torch.equal(again.train_images, synthetic_dataset.train_images) and again.checksum == synthetic_dataset.checksum
    assert torch.equal(make_splits(again, val_size=200).val_labels, computed)
    assert all(e.stat().st_size > 1000 for e in entries)  # rewritten whole


def test_a_cache_entry_whose_arrays_do_not_match_the_files_is_not_served(tmp_path, monkeypatch, synthetic_dir,
                                                                         synthetic_dataset):
    import numpy as np

    monkeypatch.setenv(data_cache.ENV_VAR, str(tmp_path / "cache"))
    load_fashion_mnist(synthetic_dir, custom=True)
    (entry,) = (tmp_path / "cache").glob("decoded-*.npz")
    with np.load(entry) as stored:
        forged = {name: stored[name] for name in stored.files}
    forged["train_images"] = forged["train_images"].copy()
    forged["train_images"][0] = 255  # other data under the same file digests
    np.savez(entry, **forged)
    again = load_fashion_mnist(synthetic_dir, custom=True)
    assert torch.equal(again.train_images, synthetic_dataset.train_images)
