"""A fast CIFAR-10 network after airbench94 (Keller Jordan, 2024), as a Keras functional model.

    whiten: 2x2 conv, 24 filters, frozen, set from the eigenvectors of training patches
            (`init_whitening`), + a bias (freezable: `callbacks.FreezeBias`) -> GELU
    group1..3: conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU   (64 / 256 / 256)
    pool:   global max pool -> x 1/9 (at 32x32 the final map is 3x3: airbench's MaxPool2d(3))

BatchNorm has no learned scale (airbench freezes it at 1) and moving statistics that keep 0.6 of
their value per step (Keras ``momentum=0.6``; airbench's ``BatchNorm(momentum=0.6)`` passes torch
``momentum=1-0.6``). Its bias is a separate `Bias` layer (``group{i}_bn{j}_bias``) that learns
``bn_bias_lr`` (airbench: 64) times faster than the other weights under SGD, which Keras optimizers,
having no parameter groups, cannot do otherwise. Convolutions start from a partial identity
(airbench's dirac init). Lookahead and multi-crop test-time augmentation are recipe options
(`keras_transfer.optim.Lookahead`, ``tta: flip_translate``); see `experiments/cifar10_fast.yaml`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers


@keras.saving.register_keras_serializable(package="keras_transfer")
class Bias(layers.Layer):
    """Adds a learned per-channel bias (so that a conv kernel can stay frozen while its bias trains).

    Args:
        lr_scale: float. The bias is stored as ``v`` and applied as ``sqrt(lr_scale) * v``: the
            gradient reaching ``v`` is ``sqrt(lr_scale)`` times larger and each change of ``v``
            moves the bias ``sqrt(lr_scale)`` times further, so (momentum) SGD trains the bias
            ``lr_scale`` times faster than a plain one; decoupled weight decay shrinks it at the
            same relative rate as other weights. airbench94 gives BatchNorm biases a 64x learning rate.
        freezable: bool. Add the state that `freeze` needs (two non-trainable weights): a copy of
            the bias and a gate, so the bias can stop training in the middle of ``fit``, where
            changing ``trainable`` would need a recompile and a fresh optimizer (and so restart the
            learning-rate schedule). airbench94 trains its whitening bias for 3 epochs only.
    """

    def __init__(self, lr_scale=1.0, freezable=False, **kwargs):
        super().__init__(**kwargs)
        if not lr_scale > 0:
            raise ValueError(f"Bias lr_scale: expected a positive number. Received: {lr_scale!r}")
        self.lr_scale, self.freezable = float(lr_scale), bool(freezable)

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")
        if self.freezable:
            self.frozen_bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", trainable=False,
                                               name="frozen_bias")
            self.gate = self.add_weight(shape=(), initializer="ones", trainable=False, name="gate")

    def _trained(self):
        # a Python float: torch.compile traces a numpy scalar as an array and fails on the product
        return self.bias if self.lr_scale == 1.0 else self.bias * math.sqrt(self.lr_scale)

    def call(self, x):
        bias = self._trained()
        if self.freezable:  # gate 1: trains; gate 0: the stored copy, and no gradient reaches `bias`
            bias = self.gate * bias + (1.0 - self.gate) * self.frozen_bias
        return x + keras.ops.cast(bias, x.dtype)

    def freeze(self):
        """Hold the bias at its current value from now on (no-op if already frozen).

        The trainable ``bias`` then gets zero gradients; the optimizer may still move it (momentum,
        weight decay), but it no longer counts until `unfreeze` writes the held value back.
        """
        if not self.freezable:
            raise ValueError(f"Bias {self.name!r} was built with freezable=False")
        if float(keras.ops.convert_to_numpy(self.gate)) == 1.0:
            # Host copies: on JAX, assigning one variable to another shares a buffer that the next
            # jitted step would donate twice.
            self.frozen_bias.assign(keras.ops.convert_to_numpy(self._trained()))
            self.gate.assign(0.0)

    def unfreeze(self):
        """Write the held value back to the trainable bias and let it train again."""
        if self.freezable and float(keras.ops.convert_to_numpy(self.gate)) == 0.0:
            self.bias.assign(keras.ops.convert_to_numpy(self.frozen_bias) / np.sqrt(self.lr_scale))
            self.gate.assign(1.0)

    def get_config(self):
        return {**super().get_config(), "lr_scale": self.lr_scale, "freezable": self.freezable}


@keras.saving.register_keras_serializable(package="keras_transfer")
class PartialDirac(keras.initializers.Initializer):
    """Conv kernel whose first ``min(in, out)`` filters are identities; the rest uniform(+-1/sqrt(fan_in)).

    The default initialisation of a torch conv, with ``torch.nn.init.dirac_`` on its first
    ``in_channels`` filters, as airbench does.
    """

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        bound = 1.0 / np.sqrt(kh * kw * cin)
        w = keras.random.uniform(shape, -bound, bound, dtype=dtype, seed=self.seed)
        n = min(cin, cout)
        eye = np.zeros(shape, "float32")
        eye[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        keep = np.ones(shape, "float32")
        keep[..., :n] = 0.0
        return w * keras.ops.convert_to_tensor(keep, dtype) + keras.ops.convert_to_tensor(eye, dtype)

    def get_config(self):
        return {"seed": self.seed}


def airbench_cnn(input_shape=(32, 32, 3), widths=(64, 256, 256), bn_bias_lr=64.0, name="backbone"):
    """Build the network (no head); blocks ``whiten``, ``group1..3`` (the weightless pool is group3's).

    Args:
        input_shape: tuple. (H, W, C) of normalised float inputs; H, W >= 16.
        widths: tuple of 3 int. Filters of the three conv groups.
        bn_bias_lr: float. Learning-rate multiplier of the BatchNorm biases (see `Bias`).
    """
    c = input_shape[-1]
    inputs = keras.Input(input_shape, name="backbone_input")
    x = layers.Conv2D(2 * 4 * c, 2, padding="valid", use_bias=False, trainable=False, name="whiten_conv")(inputs)
    x = Bias(freezable=True, name="whiten_bias")(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for i, w in enumerate(widths, start=1):
        for j in (1, 2):
            x = layers.Conv2D(w, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac(),
                            name=f"group{i}_conv{j}")(x)
            if j == 1:
                x = layers.MaxPooling2D(2, name=f"group{i}_pool")(x)
            x = layers.BatchNormalization(momentum=0.6, epsilon=1e-12, center=False, scale=False,
                                        name=f"group{i}_bn{j}")(x)
            x = Bias(bn_bias_lr, name=f"group{i}_bn{j}_bias")(x)
            x = layers.Activation("gelu", name=f"group{i}_gelu{j}")(x)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Rescaling(1.0 / 9.0, name="pool_scale")(x)
    return keras.Model(inputs, x, name=name)


def patches_2x2(x):
    """All 2x2 patches of NHWC images, flattened to (N * (H-1) * (W-1), 4 * C), in (h, w, c) order."""
    p = np.stack([x[:, i:i + x.shape[1] - 1, j:j + x.shape[2] - 1] for i in (0, 1) for j in (0, 1)], axis=3)
    return p.reshape(-1, 4 * x.shape[-1])


def init_whitening(backbone, x, eps=5e-4):
    """Set ``whiten_conv`` so that its outputs are decorrelated, unit-variance on the images ``x``.

    The kernel holds the eigenvectors of the (uncentred) 2x2-patch covariance, divided by the square
    root of their eigenvalues, each twice with opposite signs (GELU then keeps both halves).

    Args:
        backbone: keras.Model from `airbench_cnn`.
        x: float array (N, H, W, C). Normalised training images, as the backbone sees them.
    """
    conv = backbone.get_layer("whiten_conv")
    p = patches_2x2(np.asarray(x, "float64"))
    cov = p.T @ p / len(p)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    filters = vectors[:, order] / np.sqrt(values[order] + eps)  # (4C, 4C): one filter per column
    kernel = np.concatenate([filters, -filters], axis=1).reshape(2, 2, x.shape[-1], -1)
    conv.kernel.assign(kernel.astype("float32"))
