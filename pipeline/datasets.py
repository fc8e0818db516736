"""The datasets weightlapse knows: their files, published checksums, sizes and mirrors.

A mirror only changes where bytes come from; the checksums here decide which bytes are
accepted, and the published sizes bound how much a download or a decompression may take.
:func:`load_dataset` turns a downloaded directory into arrays for training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightlapse.pipeline.idx import IdxError, read_idx_file

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    # file name -> "algorithm:hexdigest" (sha256 where one is known, else the published md5)
    checksums: dict[str, str]
    # file name -> bytes of the published (gzipped) file: a download is cut off past it
    sizes: dict[str, int]
    mirrors: tuple[str, ...]
    class_names: tuple[str, ...]
    offline_hint: str = ""  # appended to the error when no mirror had the files
    n_train: int = 60_000
    n_test: int = 10_000

    def idx_bytes(self, name: str) -> int:
        """Bytes of file ``name`` once decompressed: its IDX header and data, as published."""
        n_samples = self.n_train if name in (TRAIN_IMAGES, TRAIN_LABELS) else self.n_test
        if name in (TRAIN_IMAGES, TEST_IMAGES):
            return 16 + n_samples * N_PIXELS  # 3 dimensions: (sample, row, column) uint8
        return 8 + n_samples  # 1 dimension: (sample,) uint8


DATASETS = {
    "mnist": DatasetSpec(
        name="mnist",
        checksums={
            # train-images: only the published md5 could be verified against a real copy.
            TRAIN_IMAGES: "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            TRAIN_LABELS: "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        sizes={TRAIN_IMAGES: 9_912_422, TRAIN_LABELS: 28_881, TEST_IMAGES: 1_648_877, TEST_LABELS: 4_542},
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        checksums={
            TRAIN_IMAGES: "sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            TRAIN_LABELS: "sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            TEST_IMAGES: "sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            TEST_LABELS: "sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        sizes={TRAIN_IMAGES: 26_421_856, TRAIN_LABELS: 29_491, TEST_IMAGES: 4_422_079, TEST_LABELS: 5_125},
        mirrors=(
            # Debian's dataset-fashion-mnist package: works offline once installed.
            "/usr/share/datasets/fashion-mnist/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        offline_hint=" On Debian or Ubuntu, `apt-get install dataset-fashion-mnist` installs the files "
                     "into /usr/share/datasets/fashion-mnist, which is tried without any setting.",
    ),
}

class DatasetError(ValueError):
    """A data directory does not hold a usable dataset."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (sample, pixel) float32 in [0, 1]
    labels: np.ndarray  # (sample,) int64 in [0, 10)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    file_checksums: dict[str, str]  # file name -> "sha256:..." of the bytes actually read


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(data_dir: str | Path, name: str) -> Dataset:
    """Read the four IDX files of dataset ``name`` from ``data_dir`` (the data stage's output).

    No file is decompressed past its published size, whatever its header declares.
    """
    data_dir = Path(data_dir)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    missing = [f for f in FILES if not (data_dir / f).is_file()]
    if missing:
        raise DatasetError(
            f"{data_dir}: missing {', '.join(missing)}; run the data stage first "
            f"(`dvc repro download`, or `python -m weightlapse.pipeline.download --out {data_dir}`)"
        )
    try:
        train = _split(data_dir, TRAIN_IMAGES, TRAIN_LABELS, spec)
        test = _split(data_dir, TEST_IMAGES, TEST_LABELS, spec)
    except IdxError as error:
        raise DatasetError(f"{error}; delete {data_dir} and run the data stage again") from None
    checksums = {f: "sha256:" + file_digest(data_dir / f) for f in FILES}
    return Dataset(name=name, train=train, test=test, file_checksums=checksums)


def _split(data_dir: Path, images_name: str, labels_name: str, spec: DatasetSpec) -> Split:
    images_path, labels_path = data_dir / images_name, data_dir / labels_name
    images = read_idx_file(images_path, max_bytes=spec.idx_bytes(images_name))
    labels = read_idx_file(labels_path, max_bytes=spec.idx_bytes(labels_name))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected a 1-d uint8 label array, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path.name} holds {len(images)} images but {labels_path.name} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= N_CLASSES:
        raise DatasetError(f"{labels_path}: label {labels.max()} is outside 0..9")
    pixels = images.reshape(len(images), N_PIXELS).astype(np.float32) / np.float32(255)
    return Split(images=pixels, labels=labels.astype(np.int64))
