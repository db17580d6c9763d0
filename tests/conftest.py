import os
import subprocess
import sys

import numpy as np
import pytest

SHARED_DATA = os.environ.get("KTRANSFER_SHARED_DATA") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    """The torch fast path on, as the ``ktransfer`` command has it by default (`keras_transfer.accel`)."""
    from keras_transfer import accel

    accel.enable()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    import keras

    keras.config.set_dtype_policy("float32")
    yield
    keras.backend.clear_session()


def write_digits_npz(folder):
    """A small real dataset (scikit-learn digits, 8x8) as an npz file in ``folder``; returns its path."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    path = folder / "digits.npz"
    np.savez(path, x=x[:400], y=d.target[:400], class_names=np.array([str(i) for i in range(10)]))
    return str(path)


@pytest.fixture
def digits_npz(tmp_path):
    """A small real dataset (scikit-learn digits, 8x8) as an npz file."""
    return write_digits_npz(tmp_path)


def tiny_model(image_shape=(8, 8, 1), num_classes=10, augment=(), channels=None, widths=(4, 8, 8)):
    from keras_transfer.models import build_classifier, create_backbone

    backbone = create_backbone("resnet", 8, channels or image_shape[-1], widths=widths)
    return build_classifier(backbone, "resnet", image_shape, num_classes, augment=augment, head_hidden=8)


def tiny_data(n=32, shape=(8, 8, 1), k=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, k, n)


def python_prints_ok(code, backend, cwd):
    """Runs ``code`` in a fresh interpreter (so that ``sys.modules`` starts empty) on ``backend``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": backend,
                              "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
