"""Seeded, stratified splits that give the same indices on every backend (numpy only)."""

from __future__ import annotations

import numpy as np

from keras_transfer.errors import DataError


def stratified_split(y, holdout, seed=0):
    """Split indices into ``(keep, holdout)`` with the same class proportions.

    Args:
        y: int array. Labels.
        holdout: float in (0, 1) (fraction) or int (total size of the held-out part).
        seed: int. Seed of the permutation.
    """
    y = np.asarray(y)
    n = len(y)
    n_hold = int(round(holdout * n)) if isinstance(holdout, float) else int(holdout)
    if not 0 <= n_hold < n:
        raise DataError(f"Expected a held-out size in [0, {n}). Received: {holdout}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # Largest-remainder allocation of the held-out size across classes.
    quota = counts * n_hold / n
    take = np.floor(quota).astype(int)
    rest = n_hold - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    hold = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)])
    mask = np.zeros(n, bool)
    mask[hold] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def subsample(y, per_class=None, fraction=None, seed=0, class_names=None):
    """Indices of a low-data subset: ``per_class`` images per class or a stratified ``fraction``.

    ``class_names`` (indexed by label) only words the error for a class with too few images.
    """
    y = np.asarray(y)
    if per_class is None and fraction is None:
        return np.arange(len(y))
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"Expected a fraction in (0, 1]. Received: {fraction}")
        if fraction == 1:
            return np.arange(len(y))
        keep, _ = stratified_split(y, 1.0 - fraction, seed)
        return keep
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < per_class:
            name = f"'{class_names[c]}' ({c})" if class_names is not None else str(c)
            raise DataError(f"Expected at least {per_class} images of class {name}. Received: {len(members)}")
        idx.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(idx))


def train_val_test(ds, val=0.1, per_class=None, fraction=None, seed=0):
    """Carve a stratified validation split from train, then subsample train if asked.

    Returns:
        dict with ``train``, ``val``, ``test`` -> ``(x, y)``.
    """
    keep, val_idx = stratified_split(ds.y_train, val, seed)
    try:
        sub = keep[subsample(ds.y_train[keep], per_class, fraction, seed, ds.class_names)]
    except DataError as e:
        if fraction is not None or per_class is None:
            raise
        raise DataError(f"{e} ({ds.name}: {len(val_idx)} of its {len(ds.y_train)} training images are held out "
                        f"for validation, data.val {val}; lower --per-class or data.val)") from None
    return {"train": (ds.x_train[sub], ds.y_train[sub]),
            "val": (ds.x_train[val_idx], ds.y_train[val_idx]),
            "test": (ds.x_test, ds.y_test)}
