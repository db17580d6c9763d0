import os

import keras
import numpy as np
import pytest

from keras_transfer.data.augment import PRESETS, RandomPadCrop, augmentation_layers
from keras_transfer.errors import ConfigError
from tests.conftest import tiny_data, tiny_model

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_jit_compile_after_a_fit_step(preset):
    if BACKEND == "torch" and preset != "strong":
        pytest.skip("torch.compile costs ~1 min per model on CPU; 'strong' holds every layer of the others")
    layers = augmentation_layers(preset, 3, flips=True, seed=1)
    if preset == "strong":  # also the mild layer, so one model covers all custom layers on torch
        layers = augmentation_layers("mild", 3, seed=1) + layers
    m = tiny_model((8, 8, 3), augment=layers, channels=3)
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    assert m.jit_compile is True  # Keras turns it off at compile() for layers that don't support XLA
    x, y = tiny_data(16, (8, 8, 3))
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert m.jit_compile is True


@pytest.mark.parametrize("preset", PRESETS)
def test_augmentation_is_identity_at_inference_and_in_range(preset):
    x, _ = tiny_data(8, (8, 8, 3))
    xt = keras.ops.convert_to_tensor(x.astype("float32"))
    y_train = xt
    for layer in augmentation_layers(preset, 3, seed=0):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(xt, training=False)), x)
        y_train = layer(y_train, training=True)
    out = keras.ops.convert_to_numpy(y_train)
    assert out.shape == x.shape and out.min() >= -1e-3 and out.max() <= 255 + 1e-3


def test_pad_crop_is_a_shifted_window():
    x = np.arange(2 * 8 * 8, dtype="float32").reshape(2, 8, 8, 1)
    out = keras.ops.convert_to_numpy(RandomPadCrop(2, seed=3)(x, training=True))
    padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for i in range(2):
        assert any(np.array_equal(out[i], padded[i, r:r + 8, c:c + 8]) for r in range(5) for c in range(5))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="Received: 'wild'"):
        augmentation_layers("wild", 3)
