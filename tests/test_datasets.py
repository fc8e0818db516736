import gzip

import numpy as np
import pytest
from idx_files import CLASS_NAMES, declaration, idx_bytes, write_dataset

from weightlapse.pipeline.datasets import (
    DATASETS, FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, DatasetError, declared_dataset, load_dataset,
)


def test_published_sizes_match_the_real_mnist_test_files(shared_mnist):
    spec = DATASETS["mnist"]
    for name in (TEST_IMAGES, TEST_LABELS):
        data = (shared_mnist / name).read_bytes()
        assert len(data) == spec.sizes[name]
        assert len(gzip.decompress(data)) == spec.idx_bytes(name)
    assert (spec.n_train, spec.n_test) == (60_000, 10_000)


def test_published_sizes_match_debian_fashion_mnist(debian_fashion):
    spec = DATASETS["fashion-mnist"]
    for name in FILES:
        data = (debian_fashion / name).read_bytes()
        assert len(data) == spec.sizes[name]
        assert len(gzip.decompress(data)) == spec.idx_bytes(name)


@pytest.mark.parametrize(("name", "shape", "limit"), [
    (TRAIN_IMAGES, (60_001, 28, 28), "47,040,016"),
    (TEST_LABELS, (10_001,), "10,008"),
])
def test_a_file_declaring_more_than_the_published_data_is_refused_unread(tmp_path, peak_memory, name, shape,
                                                                        limit):
    # A gzip bomb: a few KB on disk, a header declaring one sample more than the published
    # file, and all of that data present once decompressed.
    data_dir = tmp_path / "data"
    write_dataset(data_dir)
    (data_dir / name).write_bytes(gzip.compress(idx_bytes(np.zeros(shape, np.uint8))))
    assert (data_dir / name).stat().st_size < 100_000
    with peak_memory, pytest.raises(DatasetError, match=rf"{name}: header declares shape \({shape[0]}.*more than "
                                                        rf"the {limit}-byte limit; .*delete .*data and run the data "
                                                        "stage again"):
        load_dataset(data_dir, "mnist")
    assert peak_memory.peak_bytes < 4 << 20  # nothing decompressed past the header


def test_files_within_the_published_sizes_load(tmp_path):
    data_dir = tmp_path / "data"
    write_dataset(data_dir, n_train=300, n_test=10_000)
    dataset = load_dataset(data_dir, "fashion-mnist")
    assert dataset.train.images.shape == (300, 784) and dataset.test.labels.shape == (10_000,)
    with pytest.raises(DatasetError, match="unknown dataset 'cifar10'; choose one of fashion-mnist, mnist"):
        load_dataset(data_dir, "cifar10")


def test_a_declared_dataset_loads_with_its_own_class_names(tmp_path):
    write_dataset(tmp_path / "files")
    spec = declared_dataset("my-set", declaration(tmp_path / "files"))
    assert spec.mirrors == ((tmp_path / "files").as_uri(),) and spec.checksums[TRAIN_IMAGES].startswith("sha256:")
    dataset = load_dataset(tmp_path / "files", "my-set", spec=spec)
    assert dataset.class_names == tuple(CLASS_NAMES) and dataset.train.images.shape == (200, 784)


def _declared(tmp_path, **changes):
    write_dataset(tmp_path / "files")
    raw = declaration(tmp_path / "files")
    for key, value in changes.items():
        if key in FILES:
            raw["files"][key] = value
        elif value is None:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(("name", "changes", "message"), [
    ("mnist", {}, r"mnist is a built-in dataset; declare yours under another name"),
    ("../up", {}, r"'\.\./up' is not a usable dataset name"),
    ("My.Set", {}, r"not a usable dataset name; use 1-50 lowercase letters"),
    ("my-set", {TRAIN_IMAGES: {"md5": "0" * 32, "size": 10}}, r"files\.train-images-idx3-ubyte\.gz: expected \{sha256"),
    ("my-set", {TRAIN_IMAGES: {"sha256": "abc", "size": 10}}, r"sha256: expected 64 lowercase hex digits"),
    ("my-set", {TEST_LABELS: {"sha256": "0" * 64, "size": 10**9}}, r"t10k-labels-idx1-ubyte\.gz\.size: expected"),
    ("my-set", {"class_names": ["a"] * 10}, r"class_names: expected 10 different names"),
    ("my-set", {"mirrors": ["relative/dir"]}, r"mirrors: 'relative/dir' is not an http\(s\):// or file:// URL"),
    ("my-set", {"mirrors": []}, r"mirrors: expected a list of 1-10 places"),
    ("my-set", {"n_train": 10**7}, r"n_train: expected a whole number of samples from 1 to 60,000"),
    ("my-set", {"n_test": None}, r"missing n_test"),
    ("my-set", {"url": "x"}, r"unknown key\(s\) url"),
])
def test_a_bad_declaration_names_the_key_and_the_fix(tmp_path, name, changes, message):
    with pytest.raises(DatasetError, match=message):
        declared_dataset(name, _declared(tmp_path, **changes))


def test_a_declared_file_larger_than_its_samples_as_idx_is_refused(tmp_path):
    raw = _declared(tmp_path, n_train=100)  # the files hold 200: what the size could not hold is no bound
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz\.size: expected the file's size in bytes, "
                                           r"from 1 to 83,296"):
        declared_dataset("my-set", raw)
