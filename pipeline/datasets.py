"""The datasets weightlapse knows: their files, published checksums, sizes and mirrors.

A mirror only changes where bytes come from; the checksums here decide which bytes are
accepted, and the published sizes bound how much a download or a decompression may take.
:func:`declared_dataset` holds a user's own 28x28 IDX dataset, declared in params.yaml, to
the same rules. :func:`load_dataset` turns a downloaded directory into arrays for training.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
    """A data directory does not hold a usable dataset, or a declared dataset is unusable."""


# A dataset's name is a directory name under data/ and a key DVC reads as `datasets.<name>`
# (where a dot would nest), so: lowercase letters, digits, '-' and '_'.
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,49}")
# A declared dataset is held to the built-in ones' size, so the bounds params.py puts on a
# run (steps, evaluations) hold for it too.
MAX_DECLARED_SAMPLES = 60_000
MAX_MIRRORS = 10
MAX_MIRROR_CHARS = 1_000
MAX_CLASS_NAME_CHARS = 50
DECLARATION_KEYS = ("files", "class_names", "mirrors", "n_train", "n_test")


def check_dataset_name(name: Any) -> str:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise DatasetError(f"{name!r} is not a usable dataset name; use 1-50 lowercase letters, digits, '-' or '_', "
                           "starting with a letter or digit (it becomes the directory data/<name>)")
    return name


def declared_dataset(name: str, raw: Any) -> DatasetSpec:
    """A user's 28x28, 10-class IDX dataset from its declaration in params.yaml, checked as
    strictly as the built-in ones: the four files with sha256 and size, bounded sample
    counts, ten class names and where to get the files (mirrors; WEIGHTLAPSE_MIRRORS too)."""
    check_dataset_name(name)
    if name in DATASETS:
        raise DatasetError(f"{name} is a built-in dataset; declare yours under another name, or write {name}: {{}}")
    if not isinstance(raw, dict):
        raise DatasetError(f"{name}: expected a mapping with keys {', '.join(DECLARATION_KEYS)}, got {raw!r:.80}")
    unknown = sorted(set(map(str, raw)) - set(DECLARATION_KEYS))
    missing = [key for key in DECLARATION_KEYS if key not in raw]
    if unknown or missing:
        raise DatasetError(f"{name}: " + (f"unknown key(s) {', '.join(unknown)}; " if unknown else "")
                           + (f"missing {', '.join(missing)}; " if missing else "")
                           + f"a declared dataset has exactly {', '.join(DECLARATION_KEYS)}")
    n_train, n_test = (_count(name, key, raw[key]) for key in ("n_train", "n_test"))
    spec = DatasetSpec(name=name, checksums={}, sizes={}, mirrors=_mirrors(name, raw["mirrors"]),
                       class_names=_class_names(name, raw["class_names"]), n_train=n_train, n_test=n_test)
    files = raw["files"]
    if not isinstance(files, dict) or set(map(str, files)) != set(FILES):
        raise DatasetError(f"{name}.files: expected exactly the four files {', '.join(FILES)}, each with sha256 "
                           f"and size, got {sorted(map(str, files)) if isinstance(files, dict) else files!r:.80}")
    for file_name in FILES:
        checksum, size = _file_entry(f"{name}.files.{file_name}", files[file_name],
                                     max_size=spec.idx_bytes(file_name) * 101 // 100 + 4096)
        spec.checksums[file_name], spec.sizes[file_name] = checksum, size
    return spec


def _count(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DECLARED_SAMPLES:
        raise DatasetError(f"{name}.{key}: expected a whole number of samples from 1 to {MAX_DECLARED_SAMPLES:,}, "
                           f"got {value!r:.80}")
    return value


def _class_names(name: str, value: Any) -> tuple[str, ...]:
    if (not isinstance(value, list) or len(value) != N_CLASSES or len(set(map(str, value))) != N_CLASSES
            or not all(isinstance(v, str) and 0 < len(v) <= MAX_CLASS_NAME_CHARS and v.isprintable() for v in value)):
        raise DatasetError(f"{name}.class_names: expected {N_CLASSES} different names (printable text of 1-"
                           f"{MAX_CLASS_NAME_CHARS} characters), in label order 0-9, got {value!r:.120}")
    return tuple(value)


def _mirrors(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MIRRORS:
        raise DatasetError(f"{name}.mirrors: expected a list of 1-{MAX_MIRRORS} places to get the files from "
                           f"(http(s):// or file:// URLs, or absolute directories), got {value!r:.80}")
    for mirror in value:
        scheme = urlparse(mirror).scheme if isinstance(mirror, str) else None
        if (not isinstance(mirror, str) or len(mirror) > MAX_MIRROR_CHARS or not mirror.isprintable()
                or any(c.isspace() for c in mirror)
                or not (scheme in ("http", "https", "file") or (not scheme and mirror.startswith("/")))):
            raise DatasetError(f"{name}.mirrors: {mirror!r:.80} is not an http(s):// or file:// URL or an absolute "
                               "directory (without spaces, at most 1,000 characters)")
    return tuple(value)


def _file_entry(where: str, value: Any, *, max_size: int) -> tuple[str, int]:
    if not isinstance(value, dict) or set(map(str, value)) != {"sha256", "size"}:
        raise DatasetError(f"{where}: expected {{sha256: <64 hex digits>, size: <bytes>}}, got {value!r:.80}")
    digest, size = value["sha256"], value["size"]
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DatasetError(f"{where}.sha256: expected 64 lowercase hex digits (`sha256sum FILE`), got {digest!r:.80}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= max_size:
        raise DatasetError(f"{where}.size: expected the file's size in bytes, from 1 to {max_size:,} (its samples "
                           f"as IDX, gzipped or not), got {size!r:.80}")
    return f"sha256:{digest}", size


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
    class_names: tuple[str, ...]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(data_dir: str | Path, name: str, *, spec: DatasetSpec | None = None) -> Dataset:
    """Read the four IDX files of dataset ``name`` from ``data_dir`` (the data stage's output);
    ``spec``: a declared dataset's (:func:`declared_dataset`), else the built-in one's.

    No file is decompressed past its published size, whatever its header declares.
    """
    data_dir = Path(data_dir)
    if spec is None and name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}, or declare it "
                           "under datasets in params.yaml")
    spec = spec or DATASETS[name]
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
    return Dataset(name=name, train=train, test=test, file_checksums=checksums, class_names=spec.class_names)


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
