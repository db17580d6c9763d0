"""The Python API: bring your own Keras model, name its blocks, fine-tune it with this package's recipe.

Everything `keras_transfer` exports is here (``import keras_transfer as kt``)::

    base = keras.applications.MobileNetV2(include_top=False, weights="imagenet", input_shape=(96, 96, 3))
    kt.register_backbone("my_mnv2", base, value_range="-1-1")     # blocks from its layer names
    results = kt.finetune("my_mnv2", (x, y), out="runs/mine", strategies=["linear", "partial", "full"],
                          transfer={"train_last_k": 2, "backbone_lr": 0.1})

- `register_backbone` makes a functional Keras model (one image input of a fixed square size; a feature map or
  a feature vector out) a backbone like the built-in ones: its blocks are derived from its layer names
  (`derive_blocks`) or given as layer-name prefixes (a list, input to output, or ``{block: [prefixes]}``).
- `finetune` runs what ``ktransfer finetune`` runs, from the registered model's own weights (saved into the run
  directory, no pretraining stage): every strategy (scratch, linear, partial, full, gradual, the fine-tuning
  methods; discriminative learning rates with ``transfer={"backbone_lr": ..., "layer_decay": ...}``), the
  recipe's callbacks and checkpoints, the raw-pixel baselines and the report. A built-in model name works too
  (then it pretrains on ``data.source`` as the command does, unless ``model={"weights": ...}``).
- `classifier` and `apply_strategy` are the pieces, for a training loop of one's own: the classifier takes raw
  uint8 images (preprocessing inside), `apply_strategy` sets the ``trainable`` flags (compile after it).

Registered backbones live in this process: the CLI and studies (other processes) know the built-in ones only.
"""

from __future__ import annotations

import io
import os
import re

import keras
import numpy as np

from keras_transfer import config as config_lib
from keras_transfer import rundir
from keras_transfer.errors import ConfigError, KTransferError
from keras_transfer.io import atomic_write_bytes, new_run_dir, remove_created
from keras_transfer.models import build_classifier, create_backbone, get_spec, register_model
from keras_transfer.models.blocks import derive_blocks
from keras_transfer.models.registry import ModelSpec, load_weights_file
from keras_transfer.transfer import STRATEGIES, parameter_counts
from keras_transfer.transfer import apply_strategy as _apply_strategy

__all__ = ["RunConfig", "apply_strategy", "classifier", "derive_blocks", "finetune", "parameter_counts",
           "register_backbone"]

RunConfig = config_lib.RunConfig
VALUE_RANGES = ("unit", "0-255", "-1-1", "torch", "caffe")
_OWN = {}  # name -> the user's model, whose weights `finetune` starts from


def _patterns(blocks, model):
    """``(block names, {block: prefixes} or None)`` from ``blocks`` as given to `register_backbone`."""
    if blocks is None:
        return derive_blocks(model), None
    if isinstance(blocks, dict):
        patterns = {}
        for block, prefixes in blocks.items():
            prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
            if not (isinstance(block, str) and isinstance(prefixes, (list, tuple)) and prefixes
                    and all(isinstance(p, str) and p for p in prefixes)):
                raise ConfigError(f"blocks: expected {{block name: [layer-name prefixes]}}. Received: "
                                  f"{block!r}: {prefixes!r}")
            patterns[block] = tuple(prefixes)
        names = tuple(patterns)
    elif isinstance(blocks, (list, tuple)) and blocks and all(isinstance(b, str) and b for b in blocks):
        names, patterns = tuple(blocks), None
    else:
        raise ConfigError(f"blocks: expected None (derived from the layer names), a list of layer-name prefixes "
                          f"or {{block: [prefixes]}}. Received: {blocks!r}")
    if len(set(names)) < len(names):
        raise ConfigError(f"blocks: expected distinct names. Received: {list(names)}")
    return names, patterns


def _backbone(model, name="backbone"):
    """``model`` with a feature vector out: global average pooling over a feature map, named ``backbone``."""
    out = model.output
    if len(out.shape) == 4:
        out = keras.layers.GlobalAveragePooling2D(name="pool")(out)
    elif len(out.shape) != 2:
        raise ConfigError(f"Expected a model with a feature map (N, H, W, C) or vector (N, D) out. Received: output "
                          f"shape {tuple(out.shape)}")
    return keras.Model(model.input, out, name=name)


def register_backbone(name, model, *, blocks=None, value_range="unit", gradcam_layer=None):
    """Make ``model`` a backbone named ``name`` that every strategy, `classifier` and `finetune` know.

    Args:
        name: str. Not a built-in model's name; registering a name again replaces the earlier registration.
        model: a functional ``keras.Model`` with one image input of a fixed square size ``(S, S, C)`` and a
            feature map or feature vector out (keras.applications with ``include_top=False``, your own). Its
            current weights are what `finetune` starts from.
        blocks: None (derived from the layer names, `derive_blocks`), a list of layer-name prefixes (input to
            output; a layer belongs to the block with the longest matching prefix, a layer matching none to the
            block before it), or ``{block name: [prefixes]}``.
        value_range: what the model's input expects, applied inside the classifier: ``unit`` (0..1, normalised
            with the training images' channel mean and sd), ``0-255`` (the model normalises itself, as
            keras.applications' EfficientNet), ``-1-1`` (MobileNetV2's), ``torch`` (0..1 normalised with ImageNet's
            channel mean and sd: DenseNet's), ``caffe`` (BGR minus ImageNet's mean: ResNet50's and VGG16's).
        gradcam_layer: str or None. The layer whose feature map Grad-CAM reads (default: the last 4-D output).

    Returns:
        The `keras_transfer.models.ModelSpec` registered.
    """
    from keras_transfer.models import list_models

    if not (isinstance(name, str) and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name)):
        raise ConfigError(f"register_backbone: expected a name of letters, digits, '.', '_', '-'. Received: {name!r}")
    from keras_transfer.models.registry import _application_fn

    norm = name.replace("_", "").lower()
    if name not in _OWN and (_application_fn(name) or any(
            n.replace("_", "").lower() == norm and n not in _OWN for n in list_models())):
        raise ConfigError(f"register_backbone: expected a new name; {name!r} is a built-in or keras.applications "
                          f"model")
    if not isinstance(model, keras.Model) or not hasattr(model, "input") or isinstance(model.input, (list, dict)):
        raise ConfigError(f"register_backbone: expected a functional keras.Model with one image input. Received: "
                          f"{type(model).__name__}")
    shape = tuple(model.input.shape[1:])
    if len(shape) != 3 or shape[0] is None or shape[0] != shape[1] or shape[2] is None:
        raise ConfigError(f"register_backbone: expected a model with a fixed square input (S, S, C), e.g. built with "
                          f"input_shape=(96, 96, 3). Received: {shape}")
    if value_range not in VALUE_RANGES:
        raise ConfigError(f"register_backbone: value_range: expected one of {', '.join(VALUE_RANGES)}. Received: "
                          f"{value_range!r}")
    names, patterns = _patterns(blocks, model)
    maps = [layer.name for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4]
    gradcam_layer = gradcam_layer or (maps[-1] if maps else None)
    if gradcam_layer is not None and gradcam_layer not in {layer.name for layer in model.layers}:
        raise ConfigError(f"register_backbone: gradcam_layer: expected a layer of {model.name}. Received: "
                          f"{gradcam_layer!r}")
    size, channels = int(shape[0]), int(shape[2])

    def build(input_shape, weights=None, **_):
        if tuple(input_shape) != (size, size, channels):
            raise ConfigError(f"{name} was registered for input ({size}, {size}, {channels}): expected "
                              f"model.input_size {size} and channels {channels}. Received: {tuple(input_shape)}")
        backbone = _backbone(keras.models.clone_model(model))  # a fresh initialisation of the same network
        if weights not in (None, "none"):
            load_weights_file(backbone, weights)
        return backbone

    spec = ModelSpec(name, build, size, size, channels, value_range, names, gradcam_layer,
                     f"registered from Python: {model.name}", patterns=patterns, builtin=False)
    # Given blocks: each must hold a layer, in order from the input (derived ones are checked by derive_blocks).
    order = [spec.block_of(layer.name) for layer in model.layers]
    firsts = [order.index(b) if b in order else None for b in names] if blocks is not None else [0]
    if None in firsts:
        raise ConfigError(f"blocks: expected each block to match a layer of {model.name}. Received: "
                          f"{names[firsts.index(None)]!r} matches none")
    if firsts != sorted(firsts):
        raise ConfigError(f"blocks: expected them in order from the input. Received: {list(names)}; in layer order: "
                          f"{[b for _, b in sorted(zip(firsts, names))]}")
    register_model(spec)
    _OWN[name] = model
    return spec


def _spec_name(model):
    return model.name if isinstance(model, ModelSpec) else model


def classifier(model, image_shape, num_classes, *, head_hidden=256, head_dropout=0.2, seed=0):
    """A classifier around a registered backbone (``model``: its name or spec): raw uint8 images of
    ``image_shape`` in, logits out; resizing, channel adaptation and the backbone's normalisation inside. A
    backbone registered from Python starts from that model's current weights; a built-in one is freshly
    initialised."""
    spec = get_spec(_spec_name(model))
    name = spec.name
    backbone = create_backbone(name, spec.default_size, spec.channels)
    if name in _OWN:
        backbone.set_weights(_backbone(_OWN[name]).get_weights())
    return build_classifier(backbone, name, tuple(image_shape), num_classes, head_hidden=head_hidden,
                            head_dropout=head_dropout, seed=seed)


def apply_strategy(model, backbone, strategy, *, train_last_k=1, freeze_until=None, surgical_block="first"):
    """Set ``model``'s ``trainable`` flags for ``strategy`` (`keras_transfer.transfer.STRATEGIES`) by the blocks
    of ``backbone`` (its registered name or spec). Frozen BatchNorm layers run in inference mode. Compile the
    model after it (Keras reads the flags when compiling). Returns ``model``."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy: expected one of {', '.join(STRATEGIES)}. Received: {strategy!r}")
    return _apply_strategy(model, _spec_name(backbone), strategy, freeze_until, train_last_k, surgical_block)


def _target(target, run_dir):
    """A dataset name for ``target``: names as they are; ``(x, y)`` or ``(x, y, class_names)`` arrays written to
    the run directory as ``target.npz`` (so the run records its data)."""
    if isinstance(target, str):
        return target
    if not (isinstance(target, (tuple, list)) and len(target) in (2, 3)):
        raise ConfigError(f"target: expected a dataset name or (x, y[, class_names]). Received: "
                          f"{type(target).__name__}")
    x, y = np.asarray(target[0]), np.asarray(target[1])
    if (x.ndim not in (3, 4) or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y)
            or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0)):
        raise ConfigError(f"target: expected uint8 images (N, H, W[, C]) and N integer labels >= 0. Received: x "
                          f"{x.dtype} {x.shape}, y {y.dtype} {y.shape}" + (f" from {y.min()}" if y.size else ""))
    if len(target) == 3 and len(target[2]) <= int(y.max(initial=0)):
        raise ConfigError(f"target: expected a class name for every label 0..{int(y.max())}. Received: "
                          f"{len(target[2])} class names")
    arrays = {"x": x, "y": y}
    if len(target) == 3:
        arrays["class_names"] = np.asarray([str(c) for c in target[2]])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = os.path.abspath(rundir.target_path(run_dir))
    atomic_write_bytes(path, buffer.getvalue())
    return f"npz:{path}"


def finetune(model, target, out=None, *, strategies=("scratch", "linear", "partial", "full"), seed=0,
             overwrite=False, verbose=True, **sections):
    """Fine-tune ``model`` on ``target`` with each strategy and write a run directory with the report, as
    ``ktransfer finetune`` does; returns ``{strategy: metrics}`` (accuracy, macro and per-class scores,
    trainable parameters, wall time).

    Args:
        model: a registered backbone's name or spec. One registered from Python starts from its own weights
            (written to ``RUN/backbone.weights.h5``; no pretraining stage); a built-in model pretrains on
            ``data.source`` unless ``model={"weights": "imagenet" | PATH}``.
        target: a dataset name (``folder:PATH``, ``npz:PATH``, ``mnist``, ...) or arrays ``(x, y)`` /
            ``(x, y, class_names)``: uint8 images (N, H, W[, C]) and integer labels.
        out: the run directory (default ``runs/finetune-<time>``); an existing non-empty one is refused unless
            ``overwrite`` (then moved aside).
        strategies: strategy names, `keras_transfer.transfer.STRATEGIES`.
        seed: int.
        verbose: print progress as the command does.
        **sections: configuration sections as in a ``--config`` file (``data``, ``model``, ``pretrain``,
            ``finetune``, ``transfer``), e.g. ``finetune={"epochs": 10}``, ``transfer={"backbone_lr": 0.1}``.
    """
    from keras_transfer import runner

    unknown = set(sections) - {"data", "model", "pretrain", "finetune", "transfer"}
    if unknown:
        raise ConfigError(f"finetune: expected configuration sections data, model, pretrain, finetune, transfer. "
                          f"Received: {sorted(unknown)}")
    spec = get_spec(_spec_name(model))
    name = spec.name
    if isinstance(strategies, str):
        strategies = strategies.split(",")
    cfg = config_lib.with_model(config_lib.RunConfig(), name)
    cfg = config_lib.merge(cfg, {**sections, "seed": seed,
                                 "transfer": {**sections.get("transfer", {}), "strategies": list(strategies)}},
                           keep_none=True)
    existed = out is not None and os.path.isdir(out) and not os.listdir(out)
    run_dir = new_run_dir(out, "finetune", overwrite)
    written = []
    try:
        written.append(rundir.target_path(run_dir))
        update = {"data": {"target": _target(target, run_dir)}}
        if name in _OWN and not sections.get("model", {}).get("weights"):
            path = os.path.abspath(rundir.backbone_weights_path(run_dir))
            written.append(path)
            _save_weights(_backbone(_OWN[name]), path)
            update["model"] = {"weights": path, "input_size": spec.default_size, "channels": spec.channels}
        cfg = config_lib.merge(cfg, update)
        config_lib.save(cfg, rundir.config_path(run_dir))
        return runner.finetune(cfg, run_dir, echo=print if verbose else None, preview=False)
    except KTransferError:  # bad input (found before any result): nothing is left behind
        start = {os.path.basename(p) for p in written} | {rundir.CONFIG, rundir.AUGMENTATION}
        if set(os.listdir(run_dir)) <= start:
            for name_ in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name_))
            if not existed:
                os.rmdir(run_dir)
                remove_created(run_dir)
        raise


def _save_weights(model, path):
    """``model.save_weights(path)``, atomically."""
    tmp = f"{path[:-len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
    try:
        model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
