"""Build small, valid IDX datasets for tests (the real files are not in a user's clone)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from weightlapse.pipeline.datasets import FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from weightlapse.pipeline.idx import DTYPES

CODES = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}


def idx_bytes(array: np.ndarray) -> bytes:
    code = CODES[array.dtype.newbyteorder("=")]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(DTYPES[code]).tobytes()


def write_dataset(directory: Path, *, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, str]:
    """Write the four gzipped IDX files of a random 28x28, 10-class dataset; return their sha256 checksums."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    checksums = {}
    for name in FILES:
        data = gzip.compress(idx_bytes(arrays[name]), mtime=0)
        (directory / name).write_bytes(data)
        checksums[name] = "sha256:" + hashlib.sha256(data).hexdigest()
    return checksums


CLASS_NAMES = [f"class-{label}" for label in range(10)]


def declaration(directory: Path, *, mirrors: list[str] | None = None, n_train: int = 200, n_test: int = 50) -> dict:
    """params.yaml's declaration of the dataset whose files are in ``directory`` (as write_dataset wrote them)."""
    return {
        "files": {name: {"sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
                         "size": (directory / name).stat().st_size} for name in FILES},
        "class_names": list(CLASS_NAMES),
        "mirrors": mirrors if mirrors is not None else [directory.as_uri()],
        "n_train": n_train,
        "n_test": n_test,
    }
