import os

import keras


def test_backend_is_the_one_asked_for():
    # A missing KERAS_BACKEND would silently fall back to TensorFlow: refuse that.
    assert "KERAS_BACKEND" in os.environ, "set KERAS_BACKEND (tox does) so the backend is explicit"
    assert keras.config.backend() == os.environ["KERAS_BACKEND"]


def test_backend_info_names_the_backend():
    from keras_transfer.backend import backend_info

    lines = backend_info()
    assert lines[0].startswith(keras.config.backend())
    assert lines[1].startswith("devices:")
