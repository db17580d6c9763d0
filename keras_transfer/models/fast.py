"""Keras layers with faster calls where the backend needs them (torch): BatchNormalization through a
fused kernel, convolutions and max pooling without layout copies, zero padding without Keras' per-call
``Operation``, spatial means in the batch's own dtype. Elsewhere they are Keras' layers unchanged."""

from __future__ import annotations

import keras

from keras_transfer import backend


@keras.saving.register_keras_serializable(package="keras_transfer")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training-mode call on channels-last 4-D batches uses
    the backend's fused kernel (`backend.fused_batch_norm`: torch's ``native_batch_norm``).

    Keras' torch BatchNormalization computes the moments and the normalisation from separate
    elementwise ops (and their backward), a large share of a torch-backend step (benchmarks/README.md:
    1.26x faster EfficientNetB0 on an H100, 1.6-1.7x on a CPU). Same weights, same moving-statistics
    rule (biased batch variance, ``momentum``; on torch applied in place, one ``lerp_`` per statistic,
    or for all layers at once inside a forward pass: `backend.move_batch_statistics`), same inference
    path. Frozen (``trainable=False``) or in inference mode it is Keras' layer unchanged, as it is on
    JAX and TensorFlow, whose compilers fuse batch normalisation themselves.

    The class keeps Keras' name on purpose: ``.weights.h5`` files key layers by class name, so a
    weights file saved from a backbone built here loads into a stock keras.applications model and
    back (test ``test_local_weights_file_loads``); it is registered as
    ``keras_transfer>BatchNormalization``, so saved models tell the two apart.
    """

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and mask is None and len(inputs.shape) == 4 and self.axis in (-1, 3):
            out = backend.fused_batch_norm(inputs, self.gamma if self.scale else None,
                                           self.beta if self.center else None, self.epsilon, invstd=True)
            if out is not None:
                y, mean, invstd = out
                m = self.momentum
                if not backend.move_batch_statistics(self.moving_mean, self.moving_variance, mean, invstd,
                                                     self.epsilon, 1 - m):
                    variance = invstd.pow(-2) - self.epsilon
                    for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                        moving.assign(moving * m + keras.ops.cast(batch, moving.dtype) * (1 - m))
                return y
        return super().call(inputs, training=training, mask=mask)


@keras.saving.register_keras_serializable(package="keras_transfer")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose channels-last convolution goes through `backend.conv2d`.

    On torch, Keras' convolution copies every input activation twice to change its memory layout and
    back (forward and backward), about a fifth of an EfficientNetB0 training step on a CPU
    (benchmarks/README.md); `backend.conv2d` hands torch the channels-last view as it is, and the bias
    to the convolution itself. Same weights and arithmetic; on JAX and TensorFlow this is Keras'
    layer. Keras' class name, as `BatchNormalization`, so weights files load both ways.
    """

    def call(self, inputs):
        y = None
        if self.data_format == "channels_last":
            y = backend.conv2d(inputs, self.kernel, self.strides, self.padding, self.dilation_rate,
                               bias=self.bias if self.use_bias else None)
        if y is None:
            return super().call(inputs)
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package="keras_transfer")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` through `backend.conv2d`, as `Conv2D`."""

    def call(self, inputs):
        y = None
        if self.data_format == "channels_last":
            y = backend.conv2d(inputs, self.kernel, self.strides, self.padding, self.dilation_rate, depthwise=True,
                               bias=self.bias if self.use_bias else None)
        if y is None:
            return super().call(inputs)
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package="keras_transfer")
class MaxPooling2D(keras.layers.MaxPooling2D):
    """``keras.layers.MaxPooling2D`` through `backend.max_pool2d` ("valid" padding), as `Conv2D`."""

    def call(self, inputs):
        if self.data_format == "channels_last":
            y = backend.max_pool2d(inputs, self.pool_size, self.strides, self.padding)
            if y is not None:
                return y
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="keras_transfer")
class ZeroPadding2D(keras.layers.ZeroPadding2D):
    """``keras.layers.ZeroPadding2D`` through `backend.zero_pad2d`: Keras' ``ops.pad`` costs about 1 ms of
    host time per call on torch (EfficientNetB0 pads 5 times per step)."""

    def call(self, inputs):
        if self.data_format == "channels_last":
            y = backend.zero_pad2d(inputs, self.padding)
            if y is not None:
                return y
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="keras_transfer")
class GlobalAveragePooling2D(keras.layers.GlobalAveragePooling2D):
    """``keras.layers.GlobalAveragePooling2D`` through `backend.spatial_mean`: on torch, a bfloat16 /
    float16 batch is averaged in its own dtype (float32 accumulation inside torch's kernel) instead of
    being cast to float32 and back, as `Conv2D`."""

    def call(self, inputs):
        if self.data_format == "channels_last":
            y = backend.spatial_mean(inputs, self.keepdims)
            if y is not None:
                return y
        return super().call(inputs)


FAST_LAYERS = {keras.layers.BatchNormalization: BatchNormalization, keras.layers.Conv2D: Conv2D,
               keras.layers.DepthwiseConv2D: DepthwiseConv2D, keras.layers.MaxPooling2D: MaxPooling2D,
               keras.layers.ZeroPadding2D: ZeroPadding2D, keras.layers.GlobalAveragePooling2D: GlobalAveragePooling2D}


def use_fast_layers(model, swaps=None):
    """A copy of a functional ``model`` (a keras.applications network) with each Keras layer of
    ``swaps`` (a ``{keras class: our class}`` dict, default `FAST_LAYERS`) replaced by our class of the
    same name, same names and weights."""
    swaps = FAST_LAYERS if swaps is None else swaps

    def swap(layer):
        return swaps.get(type(layer), layer.__class__).from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=swap)
    clone.set_weights(model.get_weights())
    return clone


def use_channels_last_kernels(model):
    """Lay ``model``'s convolution kernels out as torch's channels-last convolution reads them
    (`backend.channels_last_kernels`; torch eager only: not for a model compiled with ``jit_compile``,
    whose convolutions torch.compile lays out itself). Returns how many were re-laid."""
    if getattr(model, "jit_compile", False):
        return 0
    kernels = [(layer.kernel, isinstance(layer, DepthwiseConv2D))
               for layer in model._flatten_layers(include_self=False, recursive=True)
               if isinstance(layer, (Conv2D, DepthwiseConv2D)) and layer.built and layer.data_format == "channels_last"]
    return backend.channels_last_kernels(model, kernels)
