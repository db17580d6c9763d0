"""Faster ``call`` methods for six Keras layers on torch, given to a built model's layer instances.

Models are built from ``keras.layers`` and saved as such; `fast_calls` then gives each layer whose type
is exactly one of `FAST_CALLS`' (in our networks and keras.applications ones alike) a ``call`` of its own,
an instance attribute that Keras' ``__call__`` (and `keras_transfer.accel.graph`) calls instead of the
class's. Each computes what Keras' own does (tested against it) and takes Keras' own path off torch, under
``torch.compile`` and for every case it does not cover:

- ``BatchNormalization`` in training mode: torch's fused ``native_batch_norm`` and in-place moving
  statistics (`kernels.fused_batch_norm`, `kernels.move_batch_statistics`). Keras' torch layer computes
  the moments and the normalisation from separate elementwise ops, a large share of a torch step
  (1.26x faster EfficientNetB0 on an H100, 1.6-1.7x on a CPU). Frozen or in inference mode: Keras' call.
- ``Conv2D`` / ``DepthwiseConv2D``: the channels-last input handed to torch as it is, the bias inside the
  convolution (`kernels.conv2d`); Keras copies every activation to NCHW memory and back.
- ``MaxPooling2D`` ("valid"), ``ZeroPadding2D``, ``GlobalAveragePooling2D``: without Keras' layout copy,
  its per-call ``Operation`` (~1 ms of host time for ``ops.pad``), or its float32 round trip for a
  bfloat16 mean (`kernels.max_pool2d`, `kernels.zero_pad2d`, `kernels.spatial_mean`).
"""

from __future__ import annotations

import types

import keras

from keras_transfer import internals
from keras_transfer.accel import kernels


def _batch_norm(self, inputs, training=None, mask=None):
    if training and self.trainable and mask is None and len(inputs.shape) == 4 and self.axis in (-1, 3):
        out = kernels.fused_batch_norm(inputs, self.gamma if self.scale else None,
                                       self.beta if self.center else None, self.epsilon, invstd=True)
        if out is not None:
            y, mean, invstd = out
            m = self.momentum
            if not kernels.move_batch_statistics(self.moving_mean, self.moving_variance, mean, invstd,
                                                 self.epsilon, 1 - m):
                variance = invstd.pow(-2) - self.epsilon
                for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                    moving.assign(moving * m + keras.ops.cast(batch, moving.dtype) * (1 - m))
            return y
    return type(self).call(self, inputs, training=training, mask=mask)


def _convolution(depthwise):
    def call(self, inputs):
        y = None
        if self.data_format == "channels_last":
            y = kernels.conv2d(inputs, self.kernel, self.strides, self.padding, self.dilation_rate,
                               depthwise=depthwise, bias=self.bias if self.use_bias else None)
        if y is None:
            return type(self).call(self, inputs)
        return y if self.activation is None else self.activation(y)

    return call


def _channels_last(kernel):
    """A layer's fast ``call`` that gives a channels-last batch to ``kernel(layer, inputs)``, and takes Keras'
    own ``call`` for any other layout or where ``kernel`` returns None."""
    def call(self, inputs):
        if self.data_format == "channels_last":
            y = kernel(self, inputs)
            if y is not None:
                return y
        return type(self).call(self, inputs)

    return call


_max_pool = _channels_last(lambda layer, x: kernels.max_pool2d(x, layer.pool_size, layer.strides, layer.padding))
_zero_pad = _channels_last(lambda layer, x: kernels.zero_pad2d(x, layer.padding))
_global_average = _channels_last(lambda layer, x: kernels.spatial_mean(x, layer.keepdims))


FAST_CALLS = {keras.layers.BatchNormalization: _batch_norm, keras.layers.Conv2D: _convolution(False),
              keras.layers.DepthwiseConv2D: _convolution(True), keras.layers.MaxPooling2D: _max_pool,
              keras.layers.ZeroPadding2D: _zero_pad, keras.layers.GlobalAveragePooling2D: _global_average}


def has_fast_call(layer):
    """Whether ``layer`` calls one of `FAST_CALLS` (given by `fast_calls`)."""
    call = vars(layer).get("call")
    return isinstance(call, types.MethodType) and call.__func__ is FAST_CALLS.get(type(layer))


def give_fast_call(layer):
    """``layer``, given its fast ``call`` (in place, an instance attribute) where its type is exactly a key of
    `FAST_CALLS`; a subclass keeps its own ``call``."""
    fn = FAST_CALLS.get(type(layer))
    if fn is not None and not has_fast_call(layer):
        layer.call = types.MethodType(fn, layer)
    return layer


def fast_calls(model):
    """`give_fast_call` for every layer of ``model``, nested ones included. Returns how many have one."""
    return sum(has_fast_call(give_fast_call(layer)) for layer in internals.flatten_layers(model))


def channels_last_kernels(model):
    """Lay ``model``'s convolution kernels out as torch's channels-last convolution reads them
    (`kernels.channels_last_kernels`; torch eager only: not for a model compiled with ``jit_compile``,
    whose convolutions torch.compile lays out itself), those with a fast call only. Returns how many were re-laid."""
    if getattr(model, "jit_compile", False):
        return 0
    found = [(layer.kernel, isinstance(layer, keras.layers.DepthwiseConv2D))
             for layer in internals.flatten_layers(model, include_self=False)
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and has_fast_call(layer)
             and layer.built and layer.data_format == "channels_last"]
    return kernels.channels_last_kernels(model, found)
