"""Classical baselines on raw pixels: scikit-learn's own numbers, on the run's split."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from keras_transfer.baselines import pixels, run_baselines
from keras_transfer.data.splits import train_val_test
from keras_transfer.errors import ConfigError
from keras_transfer.transfer import TransferConfig


def digits_splits(per_class=20, seed=0):
    from keras_transfer.data.registry import Dataset

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    ds = Dataset("digits", x[:1200], d.target[:1200], x[1200:], d.target[1200:], [str(i) for i in range(10)])
    return ds, train_val_test(ds, 0.1, per_class, None, seed)


def test_baseline_accuracy_equals_scikit_learn_on_the_same_split():
    ds, splits = digits_splits()
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    assert len(x_tr) == 200
    got = run_baselines(splits, ds.class_names)
    f_tr, f_te = x_tr.reshape(len(x_tr), -1) / 255.0, x_te.reshape(len(x_te), -1) / 255.0
    knn = KNeighborsClassifier(n_neighbors=1).fit(f_tr, y_tr).score(f_te, y_te)
    logreg = LogisticRegression(max_iter=1000).fit(f_tr, y_tr).score(f_te, y_te)
    assert got["knn"]["accuracy"] == pytest.approx(knn, abs=1e-12)
    assert got["logreg"]["accuracy"] == pytest.approx(logreg, abs=1e-12)
    assert 0.85 < got["knn"]["accuracy"] < 1.0  # 20 images per class of the 8x8 digits: ~0.95, not chance
    assert got["logreg"]["trainable_params"] == 64 * 10 + 10
    assert got["knn"]["trainable_params"] == 0 and got["knn"]["stored_values"] == 200 * 64
    assert got["knn"]["macro"]["f1"] > 0.8 and len(got["knn"]["per_class"]) == 10


def test_a_class_missing_from_training_is_scored_zero_not_shifted():
    ds, splits = digits_splits(per_class=3)
    x, y = splits["train"]
    keep = y != 0
    got = run_baselines({"train": (x[keep], y[keep]), "test": splits["test"]}, ds.class_names, ("knn",))
    per_class = {c["class"]: c for c in got["knn"]["per_class"]}
    assert per_class["0"]["recall"] == 0.0 and per_class["1"]["recall"] > 0.5


def test_pixels_are_flat_floats_in_unit_range():
    f = pixels(np.full((2, 3, 3, 1), 255, np.uint8))
    assert f.shape == (2, 9) and f.dtype == np.float32 and f.max() == 1.0


def test_unknown_or_badly_typed_baselines_are_refused():
    with pytest.raises(ConfigError, match="transfer.baselines: expected some of logreg, knn. Received: 'svm'"):
        TransferConfig(baselines=("svm",))
    with pytest.raises(ConfigError, match="transfer.baselines: expected a list"):
        TransferConfig(baselines="knn")
    assert TransferConfig(baselines=()).baselines == ()
