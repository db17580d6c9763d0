"""Augmentation presets as jit-friendly Keras layers that run inside the model.

Keras' own ``RandomCrop``/``RandomTranslation``/``RandomRotation``/``RandomZoom``
declare ``supports_jit=False`` (a model holding one silently trains without XLA),
so the geometric ones here are written with `keras.ops` and keep XLA on. Each
layer takes images in 0..255 (any dtype) and is the identity at inference.
"""

from __future__ import annotations

import math

import keras
from keras import ops


class RandomImageLayer(keras.layers.Layer):
    """Base of the augmentation layers: a seed generator, identity at inference, float 0..255 in."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        return self.transform(ops.cast(x, self.compute_dtype))

    def transform(self, x):
        raise NotImplementedError

    def compute_output_shape(self, s):
        return s

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_transfer")
class RandomPadCrop(RandomImageLayer):
    """Pad ``pad`` pixels (reflect) and crop back to the input size at a random offset."""

    def __init__(self, pad=4, seed=None, **kwargs):
        super().__init__(seed, **kwargs)
        self.pad = pad

    def transform(self, x):
        shape = ops.shape(x)
        b, h, w = shape[0], shape[1], shape[2]
        p = self.pad
        xp = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode="reflect")
        off = keras.random.randint((b, 2), 0, 2 * p + 1, seed=self.seed_generator)
        rows = off[:, :1] + ops.arange(h)[None, :]  # (b, h)
        cols = off[:, 1:] + ops.arange(w)[None, :]  # (b, w)
        xp = ops.take_along_axis(xp, rows[:, :, None, None], axis=1)
        return ops.take_along_axis(xp, cols[:, None, :, None], axis=2)

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


def affine(x, theta, scale, shear, tx, ty, fill_value=0.0):
    """Per-image affine warp about the centre (rotation rad, zoom, shear rad, shift px).

    Bilinear sampling written with gathers, since ``ops.image.affine_transform``
    cannot be XLA-compiled on the TensorFlow backend.
    """
    shape = ops.shape(x)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    hf, wf = ops.cast(h, "float32"), ops.cast(w, "float32")
    cos, sin, tan = ops.cos(theta), ops.sin(theta), ops.tan(shear)
    # Output->input mapping about the centre.
    a0, a1 = cos / scale, (-sin + tan * cos) / scale
    b0, b1 = sin / scale, (cos + tan * sin) / scale
    cx, cy = (wf - 1) / 2, (hf - 1) / 2
    gy, gx = ops.meshgrid(ops.arange(h, dtype="float32") - cy, ops.arange(w, dtype="float32") - cx,
                          indexing="ij")
    gx, gy = ops.reshape(gx, (1, -1)), ops.reshape(gy, (1, -1))
    sx = a0[:, None] * gx + a1[:, None] * gy + cx - tx[:, None]
    sy = b0[:, None] * gx + b1[:, None] * gy + cy - ty[:, None]
    x0, y0 = ops.floor(sx), ops.floor(sy)
    flat = ops.reshape(ops.cast(x, "float32"), (b, -1, c))
    out = 0.0
    for dy in (0.0, 1.0):
        for dx in (0.0, 1.0):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1.0 - ops.abs(sx - xi)) * (1.0 - ops.abs(sy - yi))
            inside = (xi >= 0) & (xi <= wf - 1) & (yi >= 0) & (yi <= hf - 1)
            idx = ops.cast(ops.clip(yi, 0, hf - 1) * wf + ops.clip(xi, 0, wf - 1), "int32")
            v = ops.take_along_axis(flat, idx[:, :, None], axis=1)
            v = ops.where(inside[:, :, None], v, fill_value)
            out = out + wgt[:, :, None] * v
    return ops.cast(ops.reshape(out, shape), x.dtype)


@keras.saving.register_keras_serializable(package="keras_transfer")
class RandomAffine(RandomImageLayer):
    """Random rotation (degrees), translation (fraction) and zoom (fraction), one transform per image."""

    def __init__(self, rotation=10.0, translation=0.1, zoom=0.1, fill_value=0.0, seed=None, **kwargs):
        super().__init__(seed, **kwargs)
        self.rotation, self.translation, self.zoom = rotation, translation, zoom
        self.fill_value = fill_value

    def transform(self, x):
        shape = ops.shape(x)
        h, w = ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
        u = keras.random.uniform((shape[0], 4), -1.0, 1.0, seed=self.seed_generator)
        theta = u[:, 0] * (self.rotation * math.pi / 180.0)
        return affine(x, theta, 1.0 + u[:, 1] * self.zoom, ops.zeros_like(theta),
                      u[:, 2] * self.translation * w, u[:, 3] * self.translation * h, self.fill_value)

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "translation": self.translation,
                "zoom": self.zoom, "fill_value": self.fill_value}


@keras.saving.register_keras_serializable(package="keras_transfer")
class JitRandAugment(RandomImageLayer):
    """RandAugment (Cubuk et al. 2020) written with `keras.ops` so models keep XLA.

    Each image gets ``num_ops`` operations drawn uniformly from: identity,
    auto-contrast, brightness, contrast, solarize, posterize, rotate, shear-x,
    translate-x, translate-y; ``magnitude`` in [0, 1] scales their strength. Keras'
    own ``RandAugment`` holds layers that declare ``supports_jit=False``.
    """

    NUM_CHOICES = 10

    def __init__(self, num_ops=2, magnitude=0.5, seed=None, **kwargs):
        super().__init__(seed, **kwargs)
        self.num_ops, self.magnitude = num_ops, magnitude

    def _one(self, x, choice, sign):
        m = self.magnitude
        shape = ops.shape(x)
        w = ops.cast(shape[2], "float32")
        zero = ops.zeros_like(sign)
        lo = ops.min(x, axis=(1, 2, 3), keepdims=True)
        hi = ops.max(x, axis=(1, 2, 3), keepdims=True)
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        k = 2.0 ** (8 - int(round(8 - 4 * m)))
        s4 = sign[:, None, None, None]
        candidates = [
            x,
            (x - lo) * 255.0 / ops.maximum(hi - lo, 1.0),
            x * (1.0 + 0.9 * m * s4),
            mean + (x - mean) * (1.0 + 0.9 * m * s4),
            ops.where(x >= 255.0 * (1.0 - m), 255.0 - x, x),
            ops.floor(x / k) * k,
            affine(x, sign * m * math.pi / 6, ops.ones_like(sign), zero, zero, zero, 128.0),
            affine(x, zero, ops.ones_like(sign), sign * m * 0.3, zero, zero, 128.0),
            affine(x, zero, ops.ones_like(sign), zero, sign * m * 0.3 * w, zero, 128.0),
            affine(x, zero, ops.ones_like(sign), zero, zero, sign * m * 0.3 * w, 128.0),
        ]
        out = candidates[0]
        for i, cand in enumerate(candidates[1:], start=1):
            out = ops.where(ops.equal(choice, i)[:, None, None, None], cand, out)
        return ops.clip(out, 0.0, 255.0)

    def transform(self, x):
        b = ops.shape(x)[0]
        for _ in range(self.num_ops):
            choice = keras.random.randint((b,), 0, self.NUM_CHOICES, seed=self.seed_generator)
            sign = ops.sign(keras.random.uniform((b,), -1.0, 1.0, seed=self.seed_generator))
            x = self._one(x, choice, sign)
        return x

    def get_config(self):
        return {**super().get_config(), "num_ops": self.num_ops, "magnitude": self.magnitude}


PRESETS = ("none", "mild", "translate", "strong")


def augmentation_layers(preset, channels, flips=True, seed=None):
    """The list of layers for an augmentation preset.

    Args:
        preset: str. ``none``; ``mild`` (small rotation/translation/zoom, no flips); ``translate``
            (pad-2 reflect random crop, horizontal flip when ``flips``: airbench's augmentation);
            ``strong`` (pad-4 random crop, horizontal flip when ``flips``, RandAugment
            for RGB, RandomErasing p=0.1), as in the CIFAR-10 seed.
        channels: int. Image channels (RandAugment needs 3).
        flips: bool. Allow horizontal flips (never for digits and letters).
        seed: int or None.
    """
    if preset not in PRESETS:
        from keras_transfer.errors import ConfigError

        raise ConfigError(f"Unknown augmentation preset: expected one of {PRESETS}. Received: {preset!r}")
    if preset == "none":
        return []
    if preset == "mild":
        return [RandomAffine(10.0, 0.08, 0.08, seed=seed, name="aug_affine")]
    if preset == "translate":
        layers = [RandomPadCrop(2, seed=seed, name="aug_padcrop")]
        if flips:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
        return layers
    layers = [RandomPadCrop(4, seed=seed, name="aug_padcrop")]
    if flips:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
    if channels == 3:
        layers.append(JitRandAugment(2, 0.5, seed=seed, name="aug_randaugment"))
    layers.append(keras.layers.RandomErasing(factor=0.1, scale=(0.02, 0.2), value_range=(0, 255),
                                             seed=seed, name="aug_erasing"))
    return layers
