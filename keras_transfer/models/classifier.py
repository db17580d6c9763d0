"""Wrap a backbone into a classifier that takes raw uint8 images.

The classifier is one functional model: ``image (uint8)`` -> cast -> augmentation
(training only) -> resize to the backbone's input -> channel adaptation -> value
range / normalisation -> ``backbone`` -> MLP head -> logits. A saved ``.keras``
file therefore takes raw pixels on every backend.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from keras_transfer.errors import ConfigError
from keras_transfer.models.registry import get_spec

HEAD_PREFIX = "head_"


@keras.saving.register_keras_serializable(package="keras_transfer")
class ChannelAdapter(layers.Layer):
    """Repeat 1 channel to ``channels`` or average ``C`` channels down to 1."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def call(self, x):
        c = x.shape[-1]
        if c == self.channels:
            return x
        if c == 1:
            return ops.repeat(x, self.channels, axis=-1)
        if self.channels == 1:
            return ops.mean(x, axis=-1, keepdims=True)
        raise ValueError(f"Cannot adapt {c} channels to {self.channels}")

    def compute_output_shape(self, s):
        return (*s[:-1], self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="keras_transfer")
class ReverseChannels(layers.Layer):
    """RGB -> BGR (for caffe-style keras.applications backbones)."""

    def call(self, x):
        return ops.flip(x, axis=-1)


def create_backbone(name, input_size=None, channels=None, weights=None, **options):
    """Build a registered backbone.

    Args:
        name: str. A name from `list_models()`.
        input_size: int or None. Input side; ``None`` keeps the model's default.
        channels: int or None. Backbone input channels; ``None`` keeps the default.
        weights: None, ``"none"``, ``"imagenet"`` or a path to a weights file.
        **options: builder knobs (``widths``, ``blocks_per_stage``, ``batch_norm``,
            ``dropout``, ``pooling`` for ``resnet``; ``widths``, ``bn_bias_lr`` for ``airbench``).
    """
    spec = get_spec(name)
    size = input_size or spec.default_size
    if size < spec.min_size:
        raise ConfigError(f"{name} needs inputs of at least {spec.min_size}x{spec.min_size} (model.input_size, "
                          f"--input-size; its default is {spec.default_size}). Received: {size}")
    ch = channels or spec.channels
    if ch != spec.channels and spec.value_range != "unit":
        raise ConfigError(f"{name} takes {spec.channels}-channel input only (model.channels, --channels "
                          f"{spec.channels}; grey images are repeated to {spec.channels}). Received: channels={ch}")
    allowed = {"resnet": {"widths", "blocks_per_stage", "batch_norm", "dropout", "pooling"},
               "airbench": {"widths", "bn_bias_lr"}}.get(name, set())
    if set(options) - allowed:
        raise ConfigError(f"Options {sorted(set(options) - allowed)} do not apply to {name!r}: expected some of "
                          f"{sorted(allowed)}. Received: {sorted(options)}")
    return spec.builder((size, size, ch), weights, **options)


def build_classifier(backbone, spec_name, image_shape, num_classes, *, mean=None, std=None,
                     augment=(), head_hidden=256, head_dropout=0.2, seed=0, feature_stats=None,
                     feature_penalty=None, name="classifier"):
    """Assemble the classifier around ``backbone``.

    Args:
        backbone: keras.Model. Output is a feature vector.
        spec_name: str. Registered name of the backbone (for its input contract).
        image_shape: tuple. (H, W, C) of the raw uint8 images.
        num_classes: int.
        mean, std: sequences or None. Per-channel statistics (0..1 scale) of the
            training images after channel adaptation; used for ``unit`` backbones.
        augment: list of layers applied in training, on 0..255 floats.
        head_hidden: int. Units of the hidden head layer; 0 gives a linear head.
        head_dropout: float.
        seed: int. Seed of the head's dropout. An explicit seed keeps its state in the model
            (saved and restored on resume); with none, the torch backend draws from torch's
            global RNG.
        feature_stats: ``(mean, variance)`` per backbone feature, or None. With them the head
            starts with a fixed `keras.layers.Normalization` of the features (``head_norm``), as for
            a linear probe on a frozen backbone (`keras_transfer.transfer.feature_statistics`).
        feature_penalty: a layer or None. Applied to the backbone's features before the head, named
            ``head_<its name>``: an identity that adds a loss in training (`keras_transfer.methods.
            BatchSpectralShrinkage`).
    """
    spec = get_spec(spec_name)
    h, w, c = backbone.input.shape[1:]
    inputs = keras.Input(tuple(image_shape), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="pre_cast")(inputs)
    for layer in augment:
        x = layer(x)
    if tuple(image_shape[:2]) != (h, w):
        x = layers.Resizing(h, w, interpolation="bilinear", name="pre_resize")(x)
    if image_shape[-1] != c:
        x = ChannelAdapter(c, name="pre_channels")(x)
    if spec.value_range == "unit":
        mean = np.broadcast_to(np.asarray(0.5 if mean is None else mean, "float32"), (c,))
        std = np.broadcast_to(np.asarray(0.25 if std is None else std, "float32"), (c,))
        x = layers.Rescaling(1.0 / 255.0, name="pre_scale")(x)
        x = layers.Normalization(mean=mean.tolist(), variance=(std ** 2).tolist(), name="pre_norm")(x)
    elif spec.value_range == "-1-1":
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="pre_scale")(x)
    elif spec.value_range == "torch":  # ImageNet's channel mean and sd on the 0..1 scale
        x = layers.Rescaling(1.0 / 255.0, name="pre_scale")(x)
        x = layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229 ** 2, 0.224 ** 2, 0.225 ** 2],
                                 name="pre_norm")(x)
    elif spec.value_range == "caffe":
        x = ReverseChannels(name="pre_bgr")(x)
        x = layers.Normalization(mean=[103.939, 116.779, 123.68], variance=[1.0, 1.0, 1.0],
                                 name="pre_norm")(x)
    x = backbone(x)
    if feature_penalty is not None:
        if not feature_penalty.name.startswith(HEAD_PREFIX):
            raise ConfigError(f"feature_penalty: expected a layer named {HEAD_PREFIX}*. "
                              f"Received: {feature_penalty.name!r}")
        x = feature_penalty(x)
    if feature_stats is not None:
        mean, variance = (np.asarray(v, "float32").tolist() for v in feature_stats)
        x = layers.Normalization(mean=mean, variance=variance, name=HEAD_PREFIX + "norm")(x)
    if head_hidden:
        x = layers.Dense(head_hidden, activation="elu", name=HEAD_PREFIX + "dense")(x)
        x = layers.Dropout(head_dropout, seed=seed, name=HEAD_PREFIX + "dropout")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name=HEAD_PREFIX + "logits")(x)
    return keras.Model(inputs, outputs, name=name)


def copy_backbone(backbone, channels=None, fresh=False):
    """An independent copy of ``backbone``; with ``channels=1`` its first conv is adapted.

    With ``fresh=True`` the copy has the same architecture and a new random
    initialisation (the ``scratch`` baseline).

    The 1-channel copy sums the pretrained first-conv kernel over its input
    channels (3 x the channel average), so the adapted conv applied to a grey
    image equals the original conv applied to that image repeated to RGB.
    """
    in_ch = backbone.input.shape[-1]
    if channels in (None, in_ch):
        clone = keras.models.clone_model(backbone)
        if not fresh:
            clone.set_weights(backbone.get_weights())
        return clone
    if channels != 1:
        raise ConfigError(f"Channel adaptation by conv averaging goes to 1 channel. Received: {channels}")
    config = backbone.get_config()
    config["layers"][0]["config"]["batch_shape"] = (*config["layers"][0]["config"]["batch_shape"][:-1], 1)
    for layer_config in config["layers"]:  # rebuild from the new input, not the recorded shapes
        layer_config.pop("build_config", None)
    clone = keras.Model.from_config(config)
    if fresh:
        return clone
    first_conv = next(layer.name for layer in backbone.layers if isinstance(layer, layers.Conv2D))
    for src in backbone.layers:
        weights = src.get_weights()
        if src.name == first_conv:
            weights[0] = weights[0].sum(axis=2, keepdims=True)
        clone.get_layer(src.name).set_weights(weights)
    return clone


def backbone_inputs(model, x, batch_size=256):
    """What the classifier's backbone receives for uint8 images ``x`` (preprocessing, no augmentation)."""
    backbone = model.get_layer("backbone")
    i = model.layers.index(backbone)
    pre = keras.Model(model.input, model.layers[i - 1].output)
    from keras_transfer.distribute import predict

    return np.asarray(predict(pre, x, batch_size))


def initialise_from_data(model, spec_name, x, n=5000):
    """Run the backbone's data-dependent initialisation (if its spec has one) on ``n`` training images."""
    spec = get_spec(spec_name)
    if spec.data_init is not None:
        spec.data_init(model.get_layer("backbone"), backbone_inputs(model, x[:n]))


def head_layers(model):
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX)]


def channel_stats(x, channels):
    """Per-channel mean/std on a 0..1 scale of uint8 images adapted to ``channels``."""
    x = np.asarray(x, dtype=np.float32) / 255.0
    if x.shape[-1] != channels:
        x = x.mean(-1, keepdims=True) if channels == 1 else np.repeat(x, channels, axis=-1)
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2)) + 1e-6
    return mean.tolist(), std.tolist()
