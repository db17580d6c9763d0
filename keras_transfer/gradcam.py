"""Grad-CAM (Selvaraju et al. 2017) for any classifier built by keras_transfer."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_transfer.backend import value_and_grad
from keras_transfer.errors import ConfigError


def _split_backbone(backbone, layer_name):
    """``(lower, upper)``: backbone input -> ``layer_name`` output -> features."""
    if layer_name is None:
        layer_name = last_spatial_layer(backbone)
    try:
        feat = backbone.get_layer(layer_name).output
    except ValueError as e:
        raise ConfigError(f"No layer {layer_name!r} in the backbone. Received: --layer {layer_name}") from e
    lower = keras.Model(backbone.input, feat)
    try:
        upper = keras.Model(feat, backbone.output)
    except Exception as e:
        raise ConfigError(f"Grad-CAM needs a layer whose output alone determines the features (a block "
                          f"output); {layer_name!r} is inside a block. Received: --layer {layer_name}") from e
    return lower, upper, layer_name


def last_spatial_layer(backbone):
    """The last layer with a 4-D output (the last block's output)."""
    for layer in reversed(backbone.layers):
        if len(layer.output.shape) == 4:
            return layer.name
    raise ConfigError("The backbone has no spatial (4-D) layer for Grad-CAM")


def grad_cam(model, images, class_idx, layer_name=None):
    """Heatmaps in [0, 1], one per image, at the input resolution.

    Args:
        model: classifier from `build_classifier` (raw uint8 input, ``backbone`` inside).
        images: uint8 array (N, H, W, C).
        class_idx: int array (N,). Class explained for each image.
        layer_name: str or None. Backbone layer (default: the last spatial one).
    """
    backbone = model.get_layer("backbone")
    lower, upper, _ = _split_backbone(backbone, layer_name)
    idx = model.layers.index(backbone)
    x = ops.convert_to_tensor(images)
    for layer in model.layers[1:idx]:  # preprocessing (augmentation is inactive at inference)
        x = layer(x, training=False)
    feats = lower(x, training=False)
    head = model.layers[idx + 1:]
    onehot = ops.one_hot(ops.convert_to_tensor(np.asarray(class_idx, "int32")), model.output.shape[-1])

    def score(f):
        y = upper(f, training=False)
        for layer in head:
            y = layer(y, training=False)
        return ops.sum(y * ops.cast(onehot, y.dtype), axis=-1)

    _, grads = value_and_grad(score, feats)
    feats = ops.convert_to_numpy(feats).astype(np.float32)
    grads = ops.convert_to_numpy(grads).astype(np.float32)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * feats).sum(-1), 0.0)
    h, w = images.shape[1:3]
    cam = ops.convert_to_numpy(ops.image.resize(cam[..., None], (h, w), interpolation="bilinear"))[..., 0]
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-8)
