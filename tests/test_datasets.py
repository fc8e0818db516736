import gzip

import numpy as np
import pytest
from idx_files import idx_bytes, write_dataset

from weightlapse.pipeline.datasets import (
    DATASETS, FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, DatasetError, load_dataset,
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
