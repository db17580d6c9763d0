import numpy as np
import pytest

from keras_transfer.data import stratified_split, subsample, train_val_test
from keras_transfer.data.registry import Dataset
from keras_transfer.errors import DataError


def test_stratified_split_keeps_proportions_and_is_seeded():
    y = np.repeat(np.arange(10), 100)
    keep, hold = stratified_split(y, 0.1, seed=3)
    assert len(hold) == 100 and np.bincount(y[hold]).tolist() == [10] * 10
    assert not set(keep) & set(hold) and len(keep) + len(hold) == len(y)
    keep2, hold2 = stratified_split(y, 0.1, seed=3)
    np.testing.assert_array_equal(hold, hold2)
    assert not np.array_equal(hold, stratified_split(y, 0.1, seed=4)[1])


def test_split_by_count_like_cifar_seed():
    y = np.repeat(np.arange(10), 50)  # scaled-down 45,000/5,000
    keep, hold = stratified_split(y, 50, seed=0)
    assert len(hold) == 50 and len(keep) == 450


def test_low_data_subsets():
    y = np.repeat(np.arange(5), 40)
    idx = subsample(y, per_class=7, seed=0)
    assert np.bincount(y[idx]).tolist() == [7] * 5
    idx = subsample(y, fraction=0.25, seed=0)
    assert np.bincount(y[idx]).tolist() == [10] * 5


def test_too_few_images_per_class_names_the_class_and_the_validation_holdout():
    y = np.repeat(np.arange(3), 20)
    ds = Dataset("pets", np.zeros((60, 4, 4, 1), np.uint8), y, np.zeros((6, 4, 4, 1), np.uint8),
                 np.arange(6) % 3, ["cat", "dog", "fish"])
    assert np.bincount(train_val_test(ds, 0.1, per_class=18)["train"][1]).tolist() == [18] * 3
    with pytest.raises(DataError) as e:
        train_val_test(ds, 0.1, per_class=20)
    msg = str(e.value)
    assert "\n" not in msg
    assert "Expected at least 20 images of class 'cat' (0). Received: 18" in msg
    assert "6 of its 60 training images are held out for validation" in msg
