#!/usr/bin/env python
"""Build the small Fashion-MNIST dataset embedded in this repository.

The examples train out of the box, offline, on ``examples/data/fashion_mnist_small``: a class-balanced,
seeded subset of Fashion-MNIST (Zalando SE, MIT license) stored as a ``datasets``-loadable parquet
dataset with an ``Image`` feature (PNG bytes) and a ``ClassLabel`` with the class names. This script
rebuilds it bit for bit from the original idx files, so the committed data can be audited.

The idx files come from the Debian/Ubuntu package ``dataset-fashion-mnist`` or from
https://github.com/zalandoresearch/fashion-mnist (``data/fashion``); pass their folder with ``--source``.

Example:

```bash
python examples/data/build_fashion_mnist.py --source /path/to/fashion-mnist
python -c "import datasets; print(datasets.load_dataset('examples/data/fashion_mnist_small'))"
```
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import struct
from pathlib import Path

import numpy as np


CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Where the idx files are found when --source is not given: the copy next to the repository used by
# this project, then the folders the Debian package has used.
DEFAULT_SOURCES = [
    Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist",
    Path("/usr/share/dataset-fashion-mnist"),
    Path("/usr/share/datasets/fashion-mnist"),
]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "fashion_mnist_small"
MIT_NOTICE = """Fashion-MNIST: Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
USE OR OTHER DEALINGS IN THE SOFTWARE.
"""
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx_images(path: Path) -> np.ndarray:
    """Read an idx3 image file (16-byte big-endian header, then uint8 pixels) into `(N, H, W)` uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path} is not an idx3 image file (magic {magic}, expected 2051)")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an idx1 label file (8-byte big-endian header, then uint8 labels) into `(N,)` uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic != 2049:
        raise ValueError(f"{path} is not an idx1 label file (magic {magic}, expected 2049)")
    return np.frombuffer(data, dtype=np.uint8, offset=8, count=count)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of every class, drawn with a fixed seed, in original order.

    Sorting the drawn indices keeps the original file order, so a rebuild with the same seed gives the
    same rows in the same order whatever the numpy version's shuffling of ties.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise ValueError(f"class {label} has {len(candidates)} examples, fewer than {per_class}")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def encode_png(image: np.ndarray) -> bytes:
    """Encode one `(H, W)` uint8 array as a grayscale ('L') PNG with fixed settings (reproducible bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def find_source(source: Path | None) -> Path:
    """The folder holding the four idx files: `source` if given, else the first default that has them."""
    candidates = [source] if source is not None else DEFAULT_SOURCES
    for folder in candidates:
        if all((folder / name).is_file() for pair in IDX_FILES.values() for name in pair):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ...) not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install the Debian package `dataset-fashion-mnist` or download them from "
        "https://github.com/zalandoresearch/fashion-mnist and pass their folder with --source."
    )


def build(
    source: Path | None = None,
    output_dir: Path = DEFAULT_OUTPUT,
    train_per_class: int = 1500,
    test_per_class: int = 400,
    seed: int = 0,
) -> dict[str, int]:
    """Write the parquet splits, dataset card and copyright file; return the number of rows per split.

    Args:
        source: Folder with the four Fashion-MNIST idx `.gz` files (default: search the usual places).
        output_dir: Dataset folder to (re)write; its `data/` subfolder is replaced.
        train_per_class: Training images kept per class (Fashion-MNIST has 6000).
        test_per_class: Test images kept per class (Fashion-MNIST has 1000).
        seed: Seed of the class-balanced draw.
    """
    import datasets

    source = find_source(source)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    data_dir = output_dir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)

    sizes = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images_file, labels_file = IDX_FILES[split]
        images = read_idx_images(source / images_file)
        labels = read_idx_labels(source / labels_file)
        # A different seed per split so that the two draws are independent.
        keep = balanced_subset(labels, per_class, seed + (split == "test"))
        dataset = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": encode_png(images[i]), "path": None} for i in keep],
                "label": [int(labels[i]) for i in keep],
            },
            features=features,
        )
        dataset.to_parquet(str(data_dir / f"{split}-00000-of-00001.parquet"))
        sizes[split] = len(dataset)

    # The Debian copy ships its copyright file; the upstream repository has the same MIT text in LICENSE.
    if (source / "COPYRIGHT").is_file():
        shutil.copyfile(source / "COPYRIGHT", output_dir / "COPYRIGHT")
    else:
        (output_dir / "COPYRIGHT").write_text(MIT_NOTICE, encoding="utf-8")
    (output_dir / "README.md").write_text(
        dataset_card(sizes, train_per_class, test_per_class, seed), encoding="utf-8"
    )
    return sizes


def dataset_card(sizes: dict[str, int], train_per_class: int, test_per_class: int, seed: int) -> str:
    """The dataset card (README.md): Hub metadata so `load_dataset(folder)` finds the splits, then prose."""
    names = "\n".join(f"          '{i}': {name}" for i, name in enumerate(CLASS_NAMES))
    return f"""---
license: mit
pretty_name: Fashion-MNIST (small, class-balanced subset)
task_categories:
- image-classification
size_categories:
- 10K<n<100K
source_datasets:
- zalando-datasets/fashion_mnist
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
---

# Fashion-MNIST, small class-balanced subset

The default dataset of the `hf_tract` examples, so that they train offline on real images.

- **Source:** [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) by Zalando SE
  (Xiao, Rasul and Vollgraf, 2017), 28x28 grayscale images of 10 clothing classes.
- **Subset:** {train_per_class} images per class from the original training set ({sizes["train"]} in
  total) and {test_per_class} per class from the original test set ({sizes["test"]} in total), drawn
  with numpy's `default_rng({seed})` (train) and `default_rng({seed + 1})` (test), kept in original order.
- **Format:** parquet, `image` is an `Image` feature (grayscale PNG, mode `L`), `label` a `ClassLabel`.
- **Rebuild:** `python examples/data/build_fashion_mnist.py --source <folder with the idx .gz files>`
  (the files of the Debian package `dataset-fashion-mnist`, or of the upstream repository).

## License

MIT, Copyright (c) 2017 Zalando SE. See `COPYRIGHT` (the Debian copyright file of
`dataset-fashion-mnist`) for the full license text.

## Citation

```bibtex
@online{{xiao2017fashionmnist,
  author = {{Han Xiao and Kashif Rasul and Roland Vollgraf}},
  title = {{Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms}},
  date = {{2017-08-28}},
  year = {{2017}},
  eprintclass = {{cs.LG}},
  eprinttype = {{arXiv}},
  eprint = {{cs.LG/1708.07747}},
}}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="folder with the four idx .gz files")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--train_per_class", type=int, default=1500)
    parser.add_argument("--test_per_class", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = build(args.source, args.output_dir, args.train_per_class, args.test_per_class, args.seed)
    total = sum(f.stat().st_size for f in args.output_dir.rglob("*") if f.is_file())
    print(f"wrote {sizes} to {args.output_dir} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
