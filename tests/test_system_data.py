"""Datasets that install with system packages (Debian dataset-fashion-mnist)."""

import os

import numpy as np
import pytest

from keras_transfer.data import load_dataset

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION),
                    reason=f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_loads_from_the_debian_package_without_a_download(tmp_path):
    ds = load_dataset("fashion_mnist", str(tmp_path / "empty"), download=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # Zalando's published pixel statistics: mean 0.2860, std 0.3530 (train, /255).
    assert abs(ds.x_train.mean() / 255 - 0.2860) < 1e-3 and abs(ds.x_train.std() / 255 - 0.3530) < 1e-3
    assert not os.path.exists(tmp_path / "empty"), "nothing is written for a system copy"
