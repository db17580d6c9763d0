"""Every private Keras and torch symbol keras-transfer relies on, in one table, and the accessors through
which code outside `keras_transfer.accel` reads them.

Keras 3 keeps these out of its public API, so a Keras upgrade may rename or remove any of them without
notice. Code that overrides a private hook (an optimizer's ``_backend_update_step``) or looks a private
name up with ``getattr(..., default)`` would then stop working *silently*: the override is never called,
the lookup returns the default. The table is what makes such an upgrade fail loudly instead:
``tests/test_internals.py`` checks every row on every backend, and `missing` lets `keras_transfer.accel`
refuse to switch on where a row it needs is absent.

Rows are ``Internal(owner, name, backend, used_by)``: ``owner`` is an importable ``module`` or
``module:attribute`` path, or a probe (``<layer>``, ``<functional>``, ...: an instance the check builds,
for attributes set in ``__init__``); ``name`` must be an attribute of it; ``backend`` limits the row to
one backend (None: all); ``used_by`` names the modules that need it (before a colon, comma-separated) and
says what for.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import keras


class Internal(NamedTuple):
    owner: str
    name: str
    backend: str | None
    used_by: str


INTERNALS = (
    # Layers, models and the functional graph.
    Internal("<layer>", "_flatten_layers", None,
             "accel, callbacks.SeedState, methods: every layer of a model, nested ones included (flatten_layers)"),
    Internal("<layer>", "_layers", None, "methods: leaf layers own their variables (is_leaf)"),
    Internal("<layer>", "_seed_generators", None, "callbacks.SeedState: random states saved in checkpoints"),
    Internal("<layer>", "_call_context_args", None, "accel.graph: which layers take only `training` from the context"),
    Internal("<layer>", "_call_has_context_arg", None, "accel.graph: whether call() takes `training`"),
    Internal("<layer>", "input_dtype", None, "accel.graph: a direct call needs inputs of this dtype"),
    Internal("<layer>", "_track_variables", "torch", "accel.kernels: torch modules list re-laid kernels"),
    Internal("<layer>", "_torch_params", "torch", "accel.kernels: layers whose torch parameters are listed"),
    Internal("keras.src.models.functional:Functional", "call", None, "accel.graph: functional models it replaces"),
    Internal("<functional>", "_nodes_by_depth", None, "accel.graph: the graph's layer calls, in Keras' order"),
    Internal("<functional>", "_outputs_struct", None, "accel.graph: the structure of the outputs"),
    Internal("<functional>", "_standardize_inputs", None, "accel.graph: inputs as Keras' call takes them"),
    Internal("<node>", "operation", None, "accel.graph: the node's layer"),
    Internal("<node>", "is_input", None, "accel.graph"),
    Internal("<node>", "input_tensors", None, "accel.graph"),
    Internal("<node>", "outputs", None, "accel.graph"),
    Internal("<node>", "arguments", None, "accel.graph: the symbolic arguments of a call"),
    Internal("keras.src.ops.symbolic_arguments:SymbolicArguments", "fill_in", None, "accel.graph: tensors for a call"),
    Internal("<arguments>", "_single_positional_tensor", None, "accel.graph: the common one-tensor call"),
    Internal("keras.src.layers.merging.base_merge:Merge", "compute_mask", None, "accel.graph: merges make no mask"),
    Internal("keras.src.layers.preprocessing.data_layer:DataLayer", "__call__", None,
             "accel.graph: a data layer's call equals Layer's outside tf.data"),
    # Optimizers: private hooks overridden by keras_transfer.optim (never called, silently, if renamed).
    Internal("keras.optimizers:Optimizer", "_backend_update_step", None, "optim.LRMultipliers: per-group rates"),
    Internal("keras.optimizers:Optimizer", "_apply_weight_decay", None, "optim.LRMultipliers: per-group decay"),
    Internal("keras.optimizers:Optimizer", "_use_weight_decay", None, "optim.LRMultipliers"),
    Internal("keras.optimizers:Optimizer", "_update_model_variables_moving_average", None,
             "optim.Lookahead, optim.AverageOverwrite: the average update they extend"),
    Internal("<ema_optimizer>", "_model_variables_moving_average", None, "optim.Lookahead, optim.AverageOverwrite"),
    Internal("keras.optimizers:Optimizer", "add_variable_from_reference", None,
             "accel.kernels: slots follow a re-laid kernel's strides"),
    # Random state and TensorFlow's lazy import.
    Internal("keras.src.utils.rng_utils", "get_random_seed", None, "backend.import_tensorflow: the global seed"),
    Internal("keras.src.utils.module_utils", "tensorflow", None, "accel.syncs: Keras' lazy TensorFlow module"),
    Internal("keras.src.utils.module_utils", "LazyModule", None, "accel.syncs: its class, replaced"),
    Internal("keras.src.utils.module_utils:LazyModule", "available", None, "accel.syncs: the property overridden"),
    Internal("keras.src.backend.common.stateless_scope", "in_stateless_scope", None,
             "accel.kernels, accel.syncs: stateless scopes keep Keras' path"),
    Internal("keras.src.random.seed_generator:SeedGenerator", "next", None, "accel.syncs: its (0, 1) step"),
    Internal("<seed_generator>", "state", None, "accel.syncs, callbacks.SeedState"),
    # Keras' torch backend.
    Internal("<variable>", "_value", "torch", "accel.kernels: a variable's torch tensor, re-laid in place"),
    Internal("keras.src.backend.torch.core", "convert_to_tensor", "torch", "accel.syncs: numbers made on the device"),
    Internal("keras.src.backend.torch.core", "get_device", "torch", "backend.host_to_device, accel.syncs"),
    Internal("keras.src.backend.torch.core", "to_torch_dtype", "torch", "accel.syncs"),
    Internal("keras.src.backend.torch.core", "result_type", "torch", "accel.syncs"),
    Internal("keras.src.backend.torch.random", "torch_seed_generator", "torch", "accel.syncs: seeds kept on the host"),
    # torch itself.
    Internal("torch", "_foreach_pow", "torch", "accel.kernels: all BatchNorm statistics in three operators"),
    Internal("torch", "_foreach_sub_", "torch", "accel.kernels"),
    Internal("torch", "_foreach_lerp_", "torch", "accel.kernels"),
    Internal("torch", "native_batch_norm", "torch", "accel.kernels: the fused BatchNorm kernel"),
    Internal("<torch_tensor>", "_version", "torch", "accel.syncs: whether a seed state was written elsewhere"),
    Internal("torch.utils._python_dispatch", "TorchDispatchMode", "torch", "accel.diagnostics.op_counter"),
    Internal("torch.utils._pytree", "tree_leaves", "torch", "accel.diagnostics.op_counter"),
)


def _probes():
    """The instances whose attributes rows name as ``<probe>``. Built without side effects on a run: every one
    named (Keras' automatic names count up per process, and a run's layers would be named otherwise) and
    initialised without drawing a random number (an unseeded initializer draws its seed from Python's
    ``random``, and the run's weights would differ for the same seed)."""
    layer = keras.layers.Dense(2, kernel_initializer="zeros", name="ktransfer_probe_dense")
    inputs = keras.Input((3,), name="ktransfer_probe_input")
    functional = keras.Model(inputs, layer(inputs), name="ktransfer_probe_model")
    node = functional._nodes_by_depth[0][0] if hasattr(functional, "_nodes_by_depth") else None
    optimizer = keras.optimizers.SGD(use_ema=True, name="ktransfer_probe_sgd")
    optimizer.build(functional.trainable_variables)
    probes = {"layer": layer, "functional": functional, "node": node,
              "arguments": getattr(node, "arguments", None), "ema_optimizer": optimizer,
              "seed_generator": keras.random.SeedGenerator(0, name="ktransfer_probe_seed"),
              "variable": keras.Variable(1.0, name="ktransfer_probe_variable")}
    if keras.config.backend() == "torch":
        import torch

        probes["torch_tensor"] = torch.zeros(1)
    return probes


def _resolve(owner, probes):
    if owner.startswith("<"):
        return probes.get(owner[1:-1])
    module, _, attribute = owner.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return None
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part, None)
    return obj


def users(row):
    """The modules ``row`` names as its users (``accel.graph``, ``optim.LRMultipliers`` ...)."""
    return [u.strip() for u in row.used_by.split(":")[0].split(",")]


def missing(backend=None, prefix=""):
    """The rows for ``backend`` (default: the active one) whose symbol is absent, as ``owner.name`` strings;
    with ``prefix``, only rows with a user that starts with it (``"accel"``: what the fast path needs)."""
    backend = backend or keras.config.backend()
    rows = [r for r in INTERNALS if r.backend in (None, backend) and any(u.startswith(prefix) for u in users(r))]
    probes = _probes()
    gone = []
    for row in rows:
        obj = _resolve(row.owner, probes)
        if obj is None or not hasattr(obj, row.name):
            gone.append(f"{row.owner}.{row.name}")
    return gone


# Accessors for code outside keras_transfer.accel.


def flatten_layers(model, include_self=True):
    """Every layer of ``model``, nested layers and models included, each once (Keras' ``_flatten_layers``)."""
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def is_leaf(layer):
    """Whether ``layer`` holds no layer of its own (leaf layers own their variables)."""
    return not layer._layers


def seed_generators(layer):
    """The ``keras.random.SeedGenerator`` objects ``layer`` itself tracks."""
    return list(getattr(layer, "_seed_generators", None) or [])


def global_seed():
    """The seed last given to ``keras.utils.set_random_seed``, or None."""
    from keras.src.utils.rng_utils import get_random_seed

    return get_random_seed()


def torch_device():
    """The torch device Keras' torch backend computes on."""
    from keras.src.backend.torch.core import get_device

    return get_device()
