"""keras_transfer/accel/kernels.py: convolution kernels laid out as torch's channels-last convolution reads
them, with the optimizer's slots, in `compile_model` and on resume; bit-identical training."""

import dataclasses

import keras
import numpy as np
import pytest

from keras_transfer.accel import diagnostics
from keras_transfer.accel import layers as accel_layers
from keras_transfer.config import TrainConfig
from keras_transfer.data.pipeline import make_input
from keras_transfer.train import compile_model, fit, resume_state
from tests.conftest import tiny_data, tiny_model

CFG = TrainConfig(epochs=3, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                  label_smoothing=0.1, schedule="cosine", warmup_epochs=1)


def _conv_net():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(x)
    x = keras.layers.Conv2D(5, 1, groups=1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("lookahead", [0, 2])
def test_kernels_laid_out_for_torch_train_bit_identically_with_fewer_ops(monkeypatch, lookahead):
    """On torch, `compile_model` stores convolution kernels in the order torch's channels-last convolution
    reads them (`kernels.channels_last_kernels`, through `accel.apply`): the same Keras shapes and values, the
    optimizer's slots (Adam moments, Lookahead averages) in the same strides, a training step without the
    kernel and gradient copies, and bit-identical weights after training."""
    if keras.config.backend() != "torch":
        pytest.skip("a torch memory layout; elsewhere compile_model leaves the variables alone")

    cfg = TrainConfig(epochs=1, optimizer="adam", learning_rate=1e-2, weight_decay=0.0, lookahead_every=lookahead)
    x = np.random.default_rng(0).normal(size=(12, 8, 8, 3)).astype("float32")
    y = np.arange(12) % 3
    models, counts = [], []
    for relay in (False, True):
        model = _conv_net()
        before = model.get_weights()
        if not relay:
            monkeypatch.setattr(accel_layers, "channels_last_kernels", lambda m: 0)
        compile_model(model, cfg, 3)
        monkeypatch.undo()
        for a, b in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)  # builds the optimizer
        with diagnostics.op_counter() as ops:
            model.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0)
        models.append(model)
        counts.append(ops.counts)
    keras_layout, laid = models
    kernels = [layer.kernel for layer in laid.layers if hasattr(layer, "kernel") and len(layer.kernel.shape) == 4]
    assert len(kernels) == 3
    for k in kernels:
        assert not k.value.is_contiguous()  # (h, w, in, out) stored as torch reads it
        assert any(p is k.value for p in laid.parameters())  # torch's module lists the new tensors
        slots = [v for v in laid.optimizer.variables if tuple(v.shape) == tuple(k.shape)]
        assert len(slots) == 2 + (lookahead > 0) and all(s.value.stride() == k.value.stride() for s in slots)
    # The kernel copy forward and the gradient's copy back (allocation + copy), per convolution:
    for op in ("clone", "new_empty_strided"):
        assert counts[0][op] - counts[1][op] >= 3, (op, counts)
    for a, b in zip(keras_layout.get_weights(), laid.get_weights()):
        np.testing.assert_array_equal(a, b)
    x_new = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(keras_layout.predict(x_new, verbose=0), laid.predict(x_new, verbose=0))


def test_resumed_model_gets_the_torch_kernel_layout_and_trains_on_identically(tmp_path, monkeypatch):
    """`resume_state` lays the kernels out as `compile_model` does, and the optimizer slots the loader
    already built with them; the resumed run trains to the same weights as one resumed with Keras'
    layout."""
    if keras.config.backend() != "torch":
        pytest.skip("a torch memory layout")
    cfg = dataclasses.replace(CFG, optimizer="adam", epochs=2)
    x, y = tiny_data(16)
    keras.utils.set_random_seed(0)
    model = compile_model(tiny_model(), cfg, 2)
    fit(model, make_input(x, y, 8, True, 0), None, cfg, str(tmp_path), epochs=1)
    resumed = []
    for relay in (True, False):
        if not relay:
            monkeypatch.setattr(accel_layers, "channels_last_kernels", lambda m: 0)
        model, start = resume_state(str(tmp_path))
        monkeypatch.undo()
        kernels = [w for w in model.trainable_weights if len(w.shape) == 4]
        assert kernels and all(k.value.is_contiguous() != relay for k in kernels)
        for k in kernels:
            slots = [v for v in model.optimizer.variables if tuple(v.shape) == tuple(k.shape)
                     and v.name.startswith(k.path.replace("/", "_") + "_")]
            assert len(slots) == 2 and all(s.value.stride() == k.value.stride() for s in slots)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        resumed.append(model.get_weights())
    for a, b in zip(*resumed):
        np.testing.assert_array_equal(a, b)
