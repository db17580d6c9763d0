"""The CIFAR-10 seed's residual CNN, written as a Keras functional model.

Blocks are Conv -> BN -> ELU -> SpatialDropout -> Conv -> BN, plus a shortcut
(1x1 projection when the shape changes), then ELU. Stages 64 -> 128 -> 256 with
stride 2 between them, global average pooling. With the defaults it has
1.22 M parameters (1.29 M with the 256-unit MLP head).
"""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="keras_transfer")
class FreezableSpatialDropout2D(layers.SpatialDropout2D):
    """SpatialDropout2D that, like BatchNorm, runs in inference mode when frozen."""

    def call(self, inputs, training=False):
        return super().call(inputs, training=bool(training) and self.trainable)

    def get_config(self):
        # SpatialDropout2D's config leaves out ``trainable``: without it a frozen dropout came back trainable
        # from a checkpoint, so a resumed partial/linear stage dropped out inside its frozen blocks.
        return {**super().get_config(), "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        trainable = config.pop("trainable", True)  # saved before the fix: trainable, as it loaded then
        layer = cls(**config)
        layer.trainable = trainable
        return layer


def _conv_bn(x, filters, kernel, stride, batch_norm, name):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not batch_norm,
                    kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return x


def residual_block(x, filters, stride, batch_norm=True, dropout=0.1, name="block"):
    """One residual block; every layer is named ``{name}_*`` so it can be frozen by name."""
    shortcut = x
    y = _conv_bn(x, filters, 3, stride, batch_norm, f"{name}_1")
    y = layers.Activation("elu", name=f"{name}_1_elu")(y)
    if dropout:
        # An explicit seed keeps the generator state in the model (see build_classifier).
        y = FreezableSpatialDropout2D(dropout, seed=sum(map(ord, name)), name=f"{name}_drop")(y)
    y = _conv_bn(y, filters, 3, 1, batch_norm, f"{name}_2")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, batch_norm, f"{name}_proj")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("elu", name=f"{name}_out")(y)


def residual_cnn(input_shape=(32, 32, 3), widths=(64, 128, 256), blocks_per_stage=1,
                 batch_norm=True, dropout=0.1, pooling="avg", name="backbone"):
    """Build the residual CNN backbone (no head).

    Args:
        input_shape: tuple. (H, W, C) of normalised float inputs.
        widths: tuple of int. Filters per stage.
        blocks_per_stage: int.
        batch_norm: bool. Use BatchNorm after each conv.
        dropout: float. SpatialDropout2D rate; 0 disables it.
        pooling: str. ``avg`` (global average pooling) or ``flatten``.

    Returns:
        A functional `keras.Model` whose blocks are ``stem``, ``stage{i}_block{j}``
        and ``pool``; its output is the feature vector.
    """
    inputs = keras.Input(input_shape, name="backbone_input")
    x = _conv_bn(inputs, widths[0], 3, 1, batch_norm, "stem")
    x = layers.Activation("elu", name="stem_elu")(x)
    for s, w in enumerate(widths, start=1):
        for b in range(1, blocks_per_stage + 1):
            stride = 2 if (s > 1 and b == 1) else 1
            x = residual_block(x, w, stride, batch_norm, dropout, name=f"stage{s}_block{b}")
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "flatten":
        x = layers.Flatten(name="pool")(x)
    else:
        from keras_transfer.errors import ConfigError

        raise ConfigError(f"Expected pooling 'avg' or 'flatten'. Received: {pooling!r}")
    return keras.Model(inputs, x, name=name)
