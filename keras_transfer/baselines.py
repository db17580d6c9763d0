"""Classical baselines on the target's raw pixels (scikit-learn): what a method with no deep network and
no pretraining reaches on the same training and test images as the run.

A fine-tuning report that compares deep strategies only with each other cannot say whether deep transfer
earned its cost: on 20 images per class of scikit-learn's 8x8 digits, a nearest-neighbour classifier on
the raw pixels beats every strategy of the embedded main job. These rows make that visible. They are
cheap, deterministic and the same on every backend (no Keras involved).

Features: each image flattened, as float in [0, 1] (uint8 / 255), no augmentation, no resizing.
"""

from __future__ import annotations

import time

import numpy as np

from keras_transfer.errors import ConfigError

BASELINES = {
    "logreg": "logistic regression on raw pixels (scikit-learn LogisticRegression, L2, C=1, lbfgs)",
    "knn": "1-nearest-neighbour on raw pixels (scikit-learn KNeighborsClassifier, Euclidean)",
}


def check_baselines(names):
    """Raise a `ConfigError` unless every name is a known baseline."""
    for n in names:
        if n not in BASELINES:
            raise ConfigError(f"transfer.baselines: expected some of {', '.join(BASELINES)}. Received: {n!r}")


def estimator(name, seed=0):
    """The scikit-learn estimator of baseline ``name`` (unfitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    check_baselines([name])
    if name == "logreg":
        return LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    return KNeighborsClassifier(n_neighbors=1)


def pixels(x):
    """``(N, H, W, C)`` uint8 images as ``(N, H*W*C)`` float32 in [0, 1]."""
    x = np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


def run_baselines(splits, class_names, names=tuple(BASELINES), seed=0):
    """Fit each baseline on ``splits["train"]`` and score it on ``splits["test"]``.

    Returns:
        ``{name: metrics}`` with the keys of `keras_transfer.evaluate.classification_metrics` (accuracy,
        macro, per-class, confusion matrix) plus ``wall_time`` (fit and predict, seconds), ``method`` (what
        it is) and ``trainable_params`` (the fitted model's parameter count: coefficients and intercepts for
        logistic regression, the stored training pixels for nearest neighbour).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from keras_transfer.evaluate import classification_metrics

    x_tr, y_tr = splits["train"]
    x_te, y_te = splits["test"]
    f_tr, f_te = pixels(x_tr), pixels(x_te)
    k = len(class_names)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        est = estimator(name, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(f_tr, y_tr)
        scores = np.zeros((len(f_te), k))
        proba = est.predict_proba(f_te)
        scores[:, est.classes_] = proba  # classes absent from the training split keep score 0
        metrics = classification_metrics(y_te, scores, class_names)
        params = est.coef_.size + est.intercept_.size if name == "logreg" else 0
        metrics.update(strategy=name, wall_time=time.perf_counter() - t0, method=BASELINES[name],
                       trainable_params=int(params), stored_values=int(params or f_tr.size),
                       non_trainable_params=0, epochs=0)
        out[name] = metrics
    return out
