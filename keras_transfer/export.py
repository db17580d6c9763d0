"""Export a trained classifier so that it loads and predicts where this package is not installed.

`portable_model` rebuilds a classifier from Keras' own layers only: raw uint8 images in, class probabilities out,
the preprocessing inside. This package's layers are replaced by Keras layers that compute the same function at
inference (the weights moved across): subclasses of Keras layers by the Keras
classes they extend; airbench's `Bias` (``x + b``) by a 1×1 ``DepthwiseConv2D`` with unit kernel and bias
``b``; `ChannelAdapter` (grey → RGB, or RGB → grey) and `ReverseChannels` (RGB → BGR) by a 1×1 ``Conv2D``
without bias whose kernel repeats, averages or permutes the channels; the identities at inference (this package's
augmentation layers, `FreezableSpatialDropout2D`, `BatchSpectralShrinkage`) by ``Identity``. Initializers,
regularizers and constraints that are not Keras' own are reset in the copy's configuration (they act in training
only). A softmax named ``probabilities`` ends the model.

`export` writes it as a ``.keras`` file, or through Keras' own ``Model.export`` as a TensorFlow SavedModel or an
ONNX file (each needs what Keras needs for it: TensorFlow; tf2onnx and onnx, or torch's ONNX exporter).
"""

from __future__ import annotations

import os

import keras
import numpy as np
from keras import layers

from keras_transfer.errors import ConfigError

FORMATS = ("keras", "savedmodel", "onnx")
SUFFIX = {"keras": ".keras", "savedmodel": "", "onnx": ".onnx"}


def _ours(obj):
    return type(obj).__module__.startswith("keras_transfer")


def _keras_base(layer):
    """The first Keras class in ``layer``'s class hierarchy."""
    return next(c for c in type(layer).__mro__ if c.__module__.startswith("keras.") and issubclass(c, layers.Layer))


def _clean_config(config):
    """``config`` with this package's initializers, regularizers and constraints reset to Keras' defaults."""
    out = dict(config)
    for key, value in config.items():
        if key.endswith(("_initializer", "_regularizer", "_constraint")) and isinstance(value, dict) \
                and "keras_transfer" in str(value.get("module", "")) + str(value.get("registered_name", "")):
            out[key] = "zeros" if key.endswith("_initializer") else None
    return out


def _replacement(layer):
    """``(Keras layer, weights or None)`` computing what ``layer`` computes at inference, or None to keep it."""
    from keras_transfer.data.augment import RandomImageLayer
    from keras_transfer.methods import BatchSpectralShrinkage
    from keras_transfer.models.airbench import Bias
    from keras_transfer.models.classifier import ChannelAdapter, ReverseChannels
    from keras_transfer.models.resnet import FreezableSpatialDropout2D

    name = layer.name
    if isinstance(layer, (RandomImageLayer, FreezableSpatialDropout2D, BatchSpectralShrinkage)):
        return layers.Identity(name=name), None
    if isinstance(layer, Bias):
        c = layer.input.shape[-1]
        bias = keras.ops.convert_to_numpy(layer(keras.ops.zeros((1, 1, 1, c)))).reshape(c)  # x + b at x = 0
        return layers.DepthwiseConv2D(1, use_bias=True, name=name), [np.ones((1, 1, c, 1), "float32"), bias]
    if isinstance(layer, (ChannelAdapter, ReverseChannels)):
        c_in = layer.input.shape[-1]
        if isinstance(layer, ReverseChannels):
            kernel = np.eye(c_in, dtype="float32")[::-1]
        elif layer.channels == c_in:
            return layers.Identity(name=name), None
        elif c_in == 1:
            kernel = np.ones((1, layer.channels), "float32")
        else:
            kernel = np.full((c_in, 1), 1.0 / c_in, "float32")
        return layers.Conv2D(kernel.shape[1], 1, use_bias=False, name=name), [kernel.reshape(1, 1, *kernel.shape)]
    if _ours(layer) and not isinstance(layer, keras.Model):
        base = _keras_base(layer)
        config = {k: v for k, v in _clean_config(layer.get_config()).items()}
        try:
            return base.from_config(config), layer.get_weights()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"Export: expected {type(layer).__name__} ({name}) to rebuild as keras.layers."
                              f"{base.__name__}. Received: {e}") from None
    if any(k.endswith(("_initializer", "_regularizer", "_constraint")) and _ours_config(v)
           for k, v in layer.get_config().items()):
        return type(layer).from_config(_clean_config(layer.get_config())), layer.get_weights()
    return None


def _ours_config(value):
    return isinstance(value, dict) and "keras_transfer" in str(value.get("module", "")) + str(
        value.get("registered_name", ""))


def portable_model(model):
    """A copy of the classifier ``model`` made of Keras' own layers: raw images in (``model``'s input), class
    probabilities out. Its predictions equal ``softmax(model(x))`` up to float rounding."""
    weights = {}

    def swap(layer):
        found = _replacement(layer)
        if found is None:
            clone = layer.__class__.from_config(layer.get_config())
            weights[id(clone)] = layer.get_weights()
            return clone
        clone, w = found
        weights[id(clone)] = w
        return clone

    clone = keras.models.clone_model(model, clone_function=swap, recursive=True)
    for layer in _leaves(clone):
        w = weights.get(id(layer))
        if w:
            layer.set_weights(w)
    probs = layers.Softmax(name="probabilities", dtype="float32")(clone.output)
    return keras.Model(clone.input, probs, name=f"{model.name}_portable")


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        else:
            yield layer


def foreign_layers(model):
    """Names of ``model``'s layers whose class (or configuration) belongs to this package: none in a portable
    model."""
    return [layer.name for layer in _leaves(model) if _ours(layer) or any(
        _ours_config(v) for v in layer.get_config().values())]


def export(model, path, fmt="keras"):
    """Write `portable_model` of ``model`` to ``path`` in ``fmt`` (`FORMATS`); returns the portable model.

    Raises:
        ConfigError: a format this backend cannot export (what is missing named), in one line.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}. Received: {fmt!r}")
    portable = portable_model(model)
    left = foreign_layers(portable)
    if left:
        raise ConfigError(f"Export: expected only Keras' own layers. Received: {left[:3]} still this package's")
    if fmt == "keras":
        from keras_transfer.io import save_model

        save_model(portable, path)
        return portable
    backend = keras.config.backend()
    portable(np.zeros((1, *portable.input.shape[1:]), "uint8"))  # Keras exports models that have been called
    try:
        if fmt == "savedmodel":
            portable.export(path, format="tf_saved_model", verbose=False)
        else:
            portable.export(path, format="onnx", verbose=False)
    except ImportError as e:
        need = {"savedmodel": "TensorFlow (pip install tensorflow-cpu)",
                "onnx": "tf2onnx and onnx (pip install tf2onnx onnx)" if backend != "torch"
                else "torch's ONNX exporter (pip install onnx onnxscript)"}[fmt]
        raise ConfigError(f"Export to {fmt} on the {backend} backend: expected {need}. Received: ImportError: "
                          f"{str(e).splitlines()[0][:160]}") from None
    except Exception as e:  # noqa: BLE001 - whatever Keras' exporter raises, as one line
        raise ConfigError(f"Export to {fmt}: expected a model Keras can export on the {backend} backend. Received: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not os.path.exists(path):
        raise ConfigError(f"Export to {fmt}: expected Keras to write {path}. Received: nothing written")
    return portable
