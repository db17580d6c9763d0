"""Eager forward passes of functional models without Keras' per-layer ``__call__`` (torch).

On the torch backend nothing traces the forward pass: each training step runs Python through every
layer. Keras' ``Layer.__call__`` then costs more than most layers' arithmetic on a GPU's time scale:
per call it binds the call signature, walks the arguments with ``tree`` (torch's Python pytree), checks
input specs, resolves ``training`` through the call context and handles masks, name and autocast
scopes. For EfficientNetB0's 240 layers that is most of the step's host time, and an eager step is
host-bound once the host cannot queue kernels faster than the device runs them (``git show
9246364:benchmarks/README.md``, "Layer calls without Keras' __call__").

`use_direct_calls(model)` makes a functional model walk its graph itself and call each layer's
``call`` directly wherever ``__call__`` would add nothing for that layer and these inputs: the layer
is built, keeps Keras' ``__call__``, has no activity regulariser, cannot create a mask, shares the
model's dtype policy (so the model's own autocast scope is the one ``__call__`` would open) and
receives tensors of its input dtype; ``training`` is passed as Keras' functional ``call`` passes it.
Every other layer, and every nested model, is called through ``__call__`` as before (nested
functional models get their own direct calls). A call without an explicit ``training``, with a mask
or with extra arguments takes Keras' path, as do models whose graph holds a layer that can create a
mask, and so does everything under torch.compile (``jit_compile=True``: Dynamo traces the Python
anyway, and Inductor failed on the larger graphs with symbolic sizes). Same layers, same order, same
arithmetic: outputs, gradients and batch-norm statistics are
identical to Keras' (tests/test_graph.py).

JAX and TensorFlow trace the forward pass once into a compiled function, so the Python per layer is
paid at compile time only: there `use_direct_calls` leaves the model as it is. It relies on Keras'
functional internals (``_nodes_by_depth``, ``Node.arguments``: listed in `keras_transfer.internals`),
and the tests check it against Keras' own path.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
from keras.src.layers.merging.base_merge import Merge
from keras.src.layers.preprocessing.data_layer import DataLayer
from keras.src.models.functional import Functional
from keras.src.ops.symbolic_arguments import SymbolicArguments

from keras_transfer.accel import kernels

# DataLayer's __call__ differs from Layer's only inside a tf.data graph (never for torch tensors).
_KERAS_CALLS = (keras.layers.Layer.__call__, DataLayer.__call__)
_PLAIN_MASKS = (keras.layers.Layer.compute_mask, Merge.compute_mask)  # no mask in, none out


class _Step(NamedTuple):
    """One layer call of the plan."""

    node: object  # the graph node (keras.src.ops.node.Node)
    layer: keras.layers.Layer
    direct: bool  # call() may be called directly (when the inputs also have the layer's input dtype)
    takes_training: bool  # call() has a training argument
    dtype: str  # the layer's input dtype
    ids: object  # argument ids: one id, a list of ids (merge layers) or None (Keras fills them in)
    constants: dict  # with one id: the node's keyword arguments, none of them a tensor (``mask=None``)
    outs: list  # ids of the node's outputs
    last_use: list  # ids of values no later step reads, dropped after this one


def use_direct_calls(model):
    """Give ``model`` and every functional model nested in it direct layer calls (torch; in place).

    Returns ``model``. A no-op off torch, for non-functional models (and subclasses with their own
    ``call``) and where a layer of the model can create a mask (Embedding, Masking). Install again
    after changing a layer's dtype policy.
    """
    if keras.config.backend() != "torch" or not isinstance(model, Functional):
        return model
    nested = list(model._flatten_layers(include_self=False))
    if any(not isinstance(layer, keras.Model) and type(layer).compute_mask not in _PLAIN_MASKS for layer in nested):
        return model  # masks would have to flow between layers
    for m in [model, *nested]:
        if isinstance(m, Functional) and type(m).call is Functional.call:
            _install(m)
    return model


def _install(model):
    steps = _plan(model)
    if steps is None:
        return
    keras_call = type(model).call.__get__(model)
    in_ids = [id(x) for x in model.inputs]
    out_ids = [id(x) for x in model.outputs]
    single_output = isinstance(model._outputs_struct, keras.KerasTensor)

    def call(inputs, training=None, mask=None, **kwargs):
        if training is None or mask is not None or kwargs or not kernels.torch_eager():
            return keras_call(inputs, training=training, mask=mask, **kwargs)
        inputs = model._standardize_inputs(inputs)
        if any(getattr(x, "_keras_mask", None) is not None for x in inputs):
            return keras_call(inputs, training=training)
        values = dict(zip(in_ids, inputs))
        with kernels.batched_statistics():  # BatchNorm's moving statistics, all moved at the end
            _run(steps, values, training)
        outputs = [values[i] for i in out_ids]
        return outputs[0] if single_output else keras.tree.pack_sequence_as(model._outputs_struct, outputs)

    model.call = call


def _run(steps, values, training):
    """The plan's layer calls on ``values`` (``{id: tensor}``, the model inputs' ids first), in place."""
    for node, layer, direct, takes_training, dtype, ids, constants, outs, last_use in steps:
        if ids is None:
            args, kw = node.arguments.fill_in(values)
            tensors = keras.tree.flatten(args)
        elif isinstance(ids, list):
            tensors = [values[i] for i in ids]
            args, kw = (tensors,), {}
        else:
            tensors = args = (values[ids],)
            kw = dict(constants)
        if direct and all(_dtype_name(x.dtype) == dtype for x in tensors):
            if takes_training:
                kw["training"] = training
            out = layer.call(*args, **kw)
        else:  # as Keras' functional call does: training goes to every layer's __call__
            kw["training"] = training
            out = layer(*args, **kw)
        if len(outs) == 1:
            values[outs[0]] = out
        else:
            values.update(zip(outs, keras.tree.flatten(out)))
        for i in last_use:
            del values[i]


def _dtype_name(dtype, _names={}):  # noqa: B006 (a cache)
    name = _names.get(dtype)
    if name is None:
        name = _names[dtype] = keras.backend.standardize_dtype(dtype)
    return name


def _plan(model):
    """The layer calls in Keras' order, as `_Step`s; None where the model must keep Keras' path."""
    available = {id(x) for x in model.inputs}
    planned = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if not layer or node.is_input:
                continue
            if any(id(x) not in available for x in node.input_tensors):
                continue  # not computable from the inputs: Keras skips it too
            if not isinstance(layer, keras.layers.Layer) or layer._call_context_args != {"training"}:
                return None  # a bare keras.ops operation, or other call-context arguments: Keras' path
            direct = (not isinstance(layer, keras.Model) and type(layer).__call__ in _KERAS_CALLS and layer.built
                      and layer.activity_regularizer is None and layer.autocast == model.autocast
                      and layer.compute_dtype == model.compute_dtype and layer.variable_dtype == model.variable_dtype)
            planned.append((node, layer, direct, bool(layer._call_has_context_arg.get("training")),
                            layer.input_dtype, *_argument_ids(node.arguments), [id(x) for x in node.outputs]))
            available.update(id(x) for x in node.outputs)
    # Each value is dropped after its last use, as torch code drops its locals (Keras keeps them all to
    # the end of the call: in inference, and for frozen layers, that holds every activation at once).
    seen = {id(x) for x in model.outputs}  # kept to the end
    steps = []
    for fields in reversed(planned):
        ids = list(dict.fromkeys(id(x) for x in fields[0].input_tensors))
        steps.append(_Step(*fields, last_use=[i for i in ids if i not in seen]))
        seen.update(ids)
    return steps[::-1]


def _argument_ids(arguments: SymbolicArguments):
    """``(ids, constants)``: ``id`` of the one positional tensor with the node's keyword arguments when
    none of them holds a tensor (Keras records ``mask=None`` for every BatchNormalization, and looking
    it up through ``fill_in`` cost more than the layer's own Python), a list of ids for one positional
    list of tensors (merge layers), or None for anything else (filled in by Keras)."""
    args, kwargs = arguments.args, arguments.kwargs
    if arguments._single_positional_tensor is not None:
        return id(arguments._single_positional_tensor), {}
    if (len(args) == 1 and isinstance(args[0], keras.KerasTensor)
            and not any(isinstance(x, keras.KerasTensor) for x in keras.tree.flatten(kwargs))):
        return id(args[0]), dict(kwargs)
    if (not kwargs and len(args) == 1 and isinstance(args[0], list)
            and all(isinstance(x, keras.KerasTensor) for x in args[0])):
        return [id(x) for x in args[0]], {}
    return None, {}
