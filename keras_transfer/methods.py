"""Fine-tuning methods beyond freezing whole blocks: L2-SP, batch spectral shrinkage, bias / norm-only tuning,
surgical fine-tuning and LP-FT's phases.

Each is a strategy name (`keras_transfer.transfer.STRATEGIES`) and is written with public Keras only:

- ``l2sp`` (Li, Grandvalet & Davoine, "Explicit inductive bias for transfer learning with convolutional
  networks", ICML 2018): full fine-tuning with the penalty ``alpha * ||w - w0||^2`` over the backbone's
  weights (``w0``: the pretrained values) and ``beta * ||w||^2`` over the new head's kernels, as per-variable
  regularizers (`keras.Variable.regularizer`, which Keras adds to the loss like any ``kernel_regularizer``).
- ``bss`` (Chen et al., "Catastrophic forgetting meets negative transfer: batch spectral shrinkage for safe
  transfer learning", NeurIPS 2019): full fine-tuning with ``eta * sum of the k smallest squared singular
  values`` of each training batch's feature matrix added to the loss (`BatchSpectralShrinkage`, a layer
  between the backbone and the head that is the identity at inference, like `keras.layers.ActivityRegularization`).
- ``bitfit`` (Ben Zaken et al., ACL 2022; TinyTL's bias-only tuning, Cai et al., NeurIPS 2020): only the
  backbone's biases (including BatchNorm's shift) and the head train. ``norm-only`` (Frankle, Schwab &
  Morcos, ICLR 2021): only BatchNorm's scale and shift (a shift held by a layer of its own, as airbench's,
  included), and the head. In both the backbone's BatchNorm layers
  run in training mode, so their statistics are re-estimated on the target: a layer whose shift trains
  cannot keep Keras' inference mode, which follows the layer's ``trainable`` flag. The other weights are
  frozen per variable (``variable.trainable = False``).
- ``surgical`` (Lee et al., "Surgical fine-tuning improves adaptation to distribution shifts", ICLR 2023):
  one block of the backbone (``transfer.surgical_block``: ``first``, ``middle``, ``last`` or a block's name)
  and the head train; the other blocks are frozen, BatchNorm in inference mode.
- ``lp-ft`` (Kumar et al., "Fine-tuning can distort pretrained features and underperform
  out-of-distribution", ICLR 2022): a linear probe on the frozen backbone's cached features
  (``transfer.lp_epochs`` epochs), then full fine-tuning that starts from that head
  (`keras_transfer.runner`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from keras_transfer import internals
from keras_transfer.errors import ConfigError

VARIABLE_LEVEL = ("bitfit", "norm-only")  # strategies that freeze single variables, not layers
SURGICAL_POSITIONS = ("first", "middle", "last")


class L2SP(keras.regularizers.Regularizer):
    """``alpha * sum((w - w0) ** 2)``: a weight's squared distance to its pretrained value ``w0``.

    Attached to single variables (`attach_l2sp`), which Keras does not save: a loaded model has no penalty."""

    def __init__(self, w0, alpha):
        self.w0 = np.asarray(w0, "float32")
        self.alpha = float(alpha)

    def __call__(self, x):
        return self.alpha * ops.sum(ops.square(ops.cast(x, "float32") - ops.convert_to_tensor(self.w0)))

    def get_config(self):
        return {"alpha": self.alpha, "w0_shape": list(self.w0.shape)}


@keras.saving.register_keras_serializable(package="keras_transfer")
class BatchSpectralShrinkage(layers.Layer):
    """Identity that, in training, adds ``eta * sum(sigma_i ** 2)`` over the ``k`` smallest singular values of
    the batch's feature matrix (batch x features) to the model's losses (BSS, Chen et al. 2019; their
    defaults: ``eta = 0.001``, ``k = 1``)."""

    def __init__(self, eta=1e-3, k=1, **kwargs):
        super().__init__(**kwargs)
        self.eta = float(eta)
        self.k = int(k)

    def call(self, x, training=None):
        if training:
            s = ops.svd(ops.cast(x, "float32"), full_matrices=False, compute_uv=False)  # descending
            self.add_loss(self.eta * ops.sum(ops.square(s[-self.k:])))
        return x

    def compute_output_shape(self, shape):
        return shape

    def get_config(self):
        return {**super().get_config(), "eta": self.eta, "k": self.k}


def check_surgical_block(blocks, block):
    """The backbone block ``block`` names: ``first``, ``middle`` (the one at ``len // 2``), ``last`` or a block
    name; a `ConfigError` otherwise."""
    if block in SURGICAL_POSITIONS:
        return {"first": blocks[0], "middle": blocks[len(blocks) // 2], "last": blocks[-1]}[block]
    if block in blocks:
        return block
    raise ConfigError(f"transfer.surgical_block: expected one of {', '.join(SURGICAL_POSITIONS)} or a block of the "
                      f"model ({', '.join(blocks)}). Received: {block!r}")


def _is_bias(layer, variable, shifts):
    name = variable.name
    if isinstance(layer, layers.BatchNormalization):
        return name == "beta"
    return name == "bias"


def _is_norm(layer, variable, shifts):
    if isinstance(layer, layers.BatchNormalization):
        return variable.name in ("gamma", "beta")
    return layer.name in shifts and variable.name == "bias"


def _separate_shifts(backbone):
    """Names of the layers that hold a BatchNorm layer's shift outside it: a BatchNormalization built with
    ``center=False`` followed by a layer named ``<its name>_bias`` (airbench's ``group1_bn1`` and
    ``group1_bn1_bias``, whose learning rate is scaled apart)."""
    leaves = list(_backbone_layers(backbone))
    names = {layer.name for layer in leaves}
    return {f"{layer.name}_bias" for layer in leaves
            if isinstance(layer, layers.BatchNormalization) and not layer.center and f"{layer.name}_bias" in names}


def _backbone_layers(backbone):
    for layer in internals.flatten_layers(backbone, include_self=False):  # nested blocks too (keras.applications)
        if internals.is_leaf(layer):  # leaf layers own their variables
            yield layer


def freeze_variables(backbone, strategy):
    """``bitfit`` / ``norm-only``: of the backbone's trainable layers (all blocks, BatchNorm in training mode),
    freeze each variable outside the method's set (``variable.trainable = False``). Call after the layers'
    ``trainable`` flags are set (setting a layer's flag resets its variables') and before compiling.

    Returns the number of backbone weights left trainable."""
    keep = {"bitfit": _is_bias, "norm-only": _is_norm}[strategy]
    shifts = _separate_shifts(backbone)
    n = 0
    for layer in _backbone_layers(backbone):
        for v in layer.trainable_weights:
            v.trainable = bool(keep(layer, v, shifts))
            n += int(np.prod(v.shape)) if v.trainable else 0
    return n


def attach_l2sp(model, pretrained, alpha, beta):
    """Set the L2-SP regularizers on ``model``: each trainable backbone weight pulled toward its value in
    ``pretrained`` (`pretrained_values`) with ``alpha``, each head kernel toward 0
    with ``beta``. Regularizers are not saved with the model: attach again after loading a checkpoint.

    Returns ``model``."""
    from keras_transfer.models import head_layers

    weights = dict(_named_weights(model.get_layer("backbone")))
    missing = [k for k, v in weights.items() if v.trainable and k not in pretrained]
    if missing:
        raise ConfigError(f"L2-SP: expected a pretrained value for every trainable backbone weight. "
                          f"Received none for {missing[:3]}")
    for key, v in weights.items():
        v.regularizer = L2SP(pretrained[key], alpha) if alpha and v.trainable else None
    for layer in head_layers(model):
        for v in layer.trainable_weights:
            if v.name == "kernel":
                v.regularizer = keras.regularizers.L2(beta) if beta else None
    return model


def _named_weights(backbone):
    """``(layer name/variable name, variable)`` of a backbone's weights: names that a saved and reloaded copy
    of the backbone keeps (a variable's ``path`` depends on the scope it was created in)."""
    for layer in _backbone_layers(backbone):
        for v in layer.weights:
            yield f"{layer.name}/{v.name}", v


def pretrained_values(backbone):
    """``{layer name/variable name: numpy value}`` of a backbone's weights: L2-SP's ``w0``."""
    return {k: np.array(keras.ops.convert_to_numpy(v.value)) for k, v in _named_weights(backbone)}


def l2sp_penalty(model):
    """The L2-SP terms' value on ``model`` now (a float): what Keras adds to the loss."""
    return float(sum(float(keras.ops.convert_to_numpy(ops.stop_gradient(v.regularizer(v.value))))
                     for v in model.trainable_weights if v.regularizer is not None))
