"""The embedded Fashion-MNIST subset: its builder is reproducible and the committed data is what it says."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "examples" / "data" / "fashion_mnist_small"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_fashion_mnist", REPO / "examples" / "data" / "build_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_offline(folder: Path, cache_dir: Path):
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(cache_dir))


def test_embedded_dataset_loads_with_class_names(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dataset = load_offline(EMBEDDED, tmp_path)
    assert set(dataset) == {"train", "test"}
    features = dataset["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert features["label"].names == load_builder().CLASS_NAMES
    # Class-balanced, as the dataset card says.
    for split, rows in dataset.items():
        counts = Counter(rows["label"])
        assert len(counts) == 10 and len(set(counts.values())) == 1, (split, counts)
    image = dataset["test"][0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    assert (EMBEDDED / "COPYRIGHT").read_text().count("Zalando SE") >= 1
    assert "license: mit" in (EMBEDDED / "README.md").read_text()
    size_mb = sum(f.stat().st_size for f in EMBEDDED.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 12


@pytest.fixture
def idx_source(tmp_path):
    """The idx files of the project's copy, or a small synthetic set in the same format."""
    builder = load_builder()
    for folder in builder.DEFAULT_SOURCES:
        if all((folder / name).is_file() for pair in builder.IDX_FILES.values() for name in pair):
            return folder
    import gzip
    import struct

    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    for split, count in (("train", 60), ("test", 30)):
        images_file, labels_file = builder.IDX_FILES[split]
        with gzip.open(source / images_file, "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + rng.integers(0, 256, (count, 28, 28), dtype=np.uint8).tobytes())
        with gzip.open(source / labels_file, "wb") as f:
            f.write(struct.pack(">II", 2049, count) + (np.arange(count) % 10).astype(np.uint8).tobytes())
    return source


def test_builder_is_deterministic_and_matches_the_source(idx_source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    builder = load_builder()
    first, second = tmp_path / "first", tmp_path / "second"
    for output in (first, second):
        assert builder.build(idx_source, output, train_per_class=3, test_per_class=2, seed=1) == {"train": 30, "test": 20}
    for name in ("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", "README.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    dataset = load_offline(first, tmp_path / "cache")
    # Every image decodes to exactly the pixels of some source image with the same label.
    images = builder.read_idx_images(idx_source / "train-images-idx3-ubyte.gz")
    labels = builder.read_idx_labels(idx_source / "train-labels-idx1-ubyte.gz")
    keep = builder.balanced_subset(labels, 3, seed=1)
    for row, index in zip(dataset["train"], keep):
        assert row["label"] == labels[index]
        np.testing.assert_array_equal(np.asarray(row["image"]), images[index])


def test_builder_reports_missing_files(tmp_path):
    builder = load_builder()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        builder.build(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()
