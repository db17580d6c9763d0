"""The real datasets in ../shared/data load with exactly the counts of its MANIFEST.md."""

import os

import numpy as np
import pytest

from keras_transfer.data import load_dataset
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.shared_data, pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA), reason=f"real datasets not found at {SHARED_DATA} (set KTRANSFER_SHARED_DATA)")]


def _snapshot(root):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def untouched():
    before = _snapshot(SHARED_DATA)
    yield
    assert _snapshot(SHARED_DATA) == before, "shared data must not be modified"


def test_mnist_counts(untouched):
    ds = load_dataset("mnist", SHARED_DATA, download=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.x_train.mean() / 255 - 0.1307) < 1e-3


@pytest.mark.slow
def test_cifar10_counts(untouched, tmp_path_factory):
    ds = load_dataset("cifar10", SHARED_DATA, download=False)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)) / 255, [0.4913, 0.4821, 0.4465], atol=2e-3)


@pytest.mark.slow
def test_stl10_counts(untouched):
    ds = load_dataset("stl10", SHARED_DATA, download=False)
    assert ds.x_train.shape == (5000, 96, 96, 3) and ds.x_test.shape == (8000, 96, 96, 3)
    assert np.bincount(ds.y_train).tolist() == [500] * 10 and np.bincount(ds.y_test).tolist() == [800] * 10
    official = np.frombuffer(open(os.path.join(SHARED_DATA, "stl10", "train_y.bin"), "rb").read(), np.uint8)
    np.testing.assert_array_equal(ds.y_train, official.astype(np.int64) - 1)  # official order kept
