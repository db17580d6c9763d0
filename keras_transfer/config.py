"""Configuration as data: one frozen dataclass per concern, YAML in, resolved YAML out.

Precedence: dataclass defaults < ``--config run.yaml`` < command-line flags. The
resolved configuration is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

from keras_transfer.data.augment import PRESETS
from keras_transfer.data.registry import check_dataset_name
from keras_transfer.errors import ConfigError, check_ranges, is_number
from keras_transfer.methods import check_surgical_block
from keras_transfer.models import get_spec
from keras_transfer.transfer import TransferConfig, check_train_last_k

TTA_MODES = ("none", "flip", "flip_translate")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")  # keras_transfer.optim.OPTIMIZERS
SCHEDULES = ("cosine", "triangle", "plateau", "constant")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
POOLINGS = ("avg", "flatten")
INPUT_PATHS = ("auto", "memory", "tfdata")  # keras_transfer.models.resnet.residual_cnn


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Source/target datasets and how they are split, sized and augmented.

    Attributes:
        source: str. Dataset pretrained on.
        target: str. Dataset fine-tuned on.
        data_dir: str or None. Cache root (default ``$KTRANSFER_DATA_DIR``).
        val: float or int. Validation part carved from train (fraction or count).
        per_class: int or None. Low-data study: target training images per class.
        fraction: float or None. Low-data study: stratified fraction of target train.
        augment: str. Preset: ``none``, ``mild``, ``strong``.
        flips: bool, ``"alternate"`` or None. Horizontal flips in ``translate`` and ``strong`` (None: off
            for digits/letters). ``alternate``: airbench's alternating flips in the training input
            instead of random ones (`keras_transfer.data.pipeline.ArrayBatches`; in-memory path only).
        input_path: str. ``auto``, ``memory`` or ``tfdata``.
        image_size: int or None. ``folder:PATH`` datasets: every image is centre-cropped to a square and
            resized to this side when they are loaded. None keeps the images' own size when they all
            share one; otherwise the side is the median of their shorter sides, at most 256.
        batch_size: int.
        drop_last: bool. Training epochs serve only full batches, as airbench94's loader does: the
            images left over (a different few each epoch, as the order is reshuffled) wait for a
            later epoch, and every step has one batch shape, so XLA compiles one train step.
        tta: str. Test-time augmentation at evaluation: ``none``, ``flip`` or ``flip_translate``.
    """

    source: str = "mnist_5k"
    target: str = "digits"
    data_dir: str | None = None
    val: float = 0.1
    per_class: int | None = 20
    fraction: float | None = None
    augment: str = "mild"
    flips: bool | str | None = None
    input_path: str = "auto"
    image_size: int | None = None
    batch_size: int = 64
    drop_last: bool = False
    tta: str = "none"

    def __post_init__(self):
        check_dataset_name(self.source)  # here, so a bad name is refused before any run directory
        check_dataset_name(self.target)
        if self.flips not in (None, True, False, "alternate"):
            raise ConfigError(f"data.flips: expected true, false, alternate or null. Received: {self.flips!r}")
        if self.flips == "alternate" and self.input_path == "tfdata":
            raise ConfigError("data.flips: alternate needs the in-memory input path (data.input_path: memory or "
                              "auto). Received: input_path 'tfdata'")
        check_ranges("data", self, (
            ("image_size", lambda v: v is None or is_number(v, True) and v > 0, "a positive number of pixels or null"),
            ("batch_size", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
            ("per_class", lambda v: v is None or is_number(v, True) and v >= 1, "null or an integer >= 1"),
            ("fraction", lambda v: v is None or is_number(v) and 0 < v <= 1, "null or a fraction in (0, 1]"),
            ("val", lambda v: is_number(v) and (0 <= v < 1 or is_number(v, True) and v >= 1),
             "a fraction in [0, 1) or a count of images"),
        ))
        if not isinstance(self.drop_last, bool):
            raise ConfigError(f"data.drop_last: expected true or false. Received: {self.drop_last!r}")
        if self.augment not in PRESETS:
            raise ConfigError(f"data.augment: expected one of {', '.join(PRESETS)}. Received: {self.augment!r}")
        if self.input_path not in INPUT_PATHS:
            raise ConfigError(f"data.input_path: expected one of {', '.join(INPUT_PATHS)}. "
                              f"Received: {self.input_path!r}")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"Unknown test-time augmentation (data.tta): expected one of {', '.join(TTA_MODES)}. "
                              f"Received: {self.tta!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone and head.

    Attributes:
        name: str. Registered backbone.
        input_size: int or None. Backbone input side (None: the model's default).
        channels: int or None. Backbone input channels (None: the model's default).
        weights: str or None. ``none``, ``imagenet`` or a weights file (applications).
        widths, blocks_per_stage, batch_norm, dropout, pooling: residual CNN knobs (``widths``
            also sets airbench's three conv groups).
        bn_bias_lr: float. airbench only: learning-rate multiplier of its BatchNorm biases
            (airbench94: 64).
        head_hidden: int. Hidden units of the MLP head (0: linear head).
        head_dropout: float.
    """

    name: str = "resnet"
    input_size: int | None = 28
    channels: int | None = 1
    weights: str | None = None
    widths: tuple = (16, 32, 64)
    blocks_per_stage: int = 1
    batch_norm: bool = True
    dropout: float = 0.1
    pooling: str = "avg"
    bn_bias_lr: float = 64.0
    head_hidden: int = 128
    head_dropout: float = 0.2

    def __post_init__(self):
        # an unknown model is refused before any run directory; another spelling (EfficientNetB0) is the
        # registered name (efficientnet_b0)
        object.__setattr__(self, "name", get_spec(self.name).name)
        check_ranges("model", self, (
            ("input_size", lambda v: v is None or is_number(v, True) and v >= 1, "null or an integer >= 1"),
            ("channels", lambda v: v in (None, 1, 3) and not isinstance(v, bool), "null, 1 (grey) or 3 (RGB)"),
            ("head_hidden", lambda v: is_number(v, True) and v >= 0, "an integer >= 0 (0: linear head)"),
            ("head_dropout", lambda v: is_number(v) and 0 <= v < 1, "a rate in [0, 1)"),
            ("dropout", lambda v: is_number(v) and 0 <= v < 1, "a rate in [0, 1)"),
        ))
        if not (isinstance(self.widths, tuple) and self.widths and all(is_number(w, True) and w >= 1
                                                                       for w in self.widths)):
            raise ConfigError(f"model.widths: expected a list of positive integers (filters per stage). "
                              f"Received: {self.widths!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ConfigError(f"model.weights: expected none, imagenet or a weights file. Received: {self.weights!r}")
        if self.weights not in (None, "none", "imagenet") and not os.path.isfile(self.weights):
            raise ConfigError(f"model.weights: expected none, imagenet or an existing weights file (.h5, .weights.h5). "
                              f"Received: {self.weights!r} does not exist")
        if not isinstance(self.batch_norm, bool):
            raise ConfigError(f"model.batch_norm: expected true or false. Received: {self.batch_norm!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling: expected one of {', '.join(POOLINGS)}. Received: {self.pooling!r}")
        check_ranges("model", self, (
            ("blocks_per_stage", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
        ))
        if not (is_number(self.bn_bias_lr) and self.bn_bias_lr > 0):
            raise ConfigError(f"model.bn_bias_lr: expected a positive learning-rate multiplier. "
                              f"Received: {self.bn_bias_lr!r}")

    def backbone_options(self):
        if self.name == "airbench":
            return {"widths": tuple(self.widths), "bn_bias_lr": float(self.bn_bias_lr)}
        if self.name != "resnet":
            return {}
        return {"widths": tuple(self.widths), "blocks_per_stage": self.blocks_per_stage,
                "batch_norm": self.batch_norm, "dropout": self.dropout, "pooling": self.pooling}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training recipe (pretraining or fine-tuning).

    Attributes:
        epochs: int.
        optimizer: str. ``sgd``, ``adam`` or ``adamw``.
        learning_rate: float.
        momentum: float. SGD.
        nesterov: bool. SGD.
        weight_decay: float. Decoupled weight decay (Keras optimizers' ``weight_decay``).
        label_smoothing: float.
        schedule: str. ``cosine`` (linear warmup then cosine, per step), ``triangle`` (linear from
            ``start_factor`` x lr up to lr over the warmup, then linearly down to ``end_factor`` x lr, per
            step, as airbench), ``plateau`` (ReduceLROnPlateau on val loss) or ``constant``.
        warmup_epochs: float. For ``cosine`` and ``triangle``.
        start_factor, end_factor: float. For ``triangle``.
        early_stopping: int or None. Patience in epochs on validation accuracy.
        precision: str. ``float32``, ``mixed_bfloat16`` or ``mixed_float16``.
        jit_compile: bool or str. ``auto`` or a bool.
        steps_per_execution: int. Training steps per call of the compiled train function (Keras'
            ``steps_per_execution``): fewer host round trips when steps are short. JAX and TensorFlow
            only; Keras' torch trainer runs one step per call.
        ema_momentum: float. Above 0: keep an exponential moving average of the trainable weights
            (Keras optimizers' ``use_ema``), updated every step with this momentum; the model ends
            training with the averaged weights.
        ema_overwrite_every: int or None. With ``ema_momentum``: every this many steps, overwrite
            the weights with their average (`keras_transfer.optim.AverageOverwrite`: Keras' rule, by a
            select that costs torch no host-device synchronisation).
        lookahead_every: int. Above 0: airbench94's Lookahead (`keras_transfer.optim.Lookahead`):
            every this many steps pull the weights back to an average whose factor ramps up as
            ``lookahead_decay ** lookahead_every * (step / total steps) ** lookahead_power``.
        lookahead_decay, lookahead_power: float. airbench94: 0.95 and 3.
        whiten_bias_epochs: int or None. airbench only: epochs its whitening bias trains before it
            is held fixed (`keras_transfer.callbacks.FreezeBias`; airbench94: 3). None: it always trains.
    """

    epochs: int = 4
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    schedule: str = "plateau"
    warmup_epochs: float = 0
    start_factor: float = 0.0
    end_factor: float = 0.0
    early_stopping: int | None = None
    precision: str = "float32"
    jit_compile: object = "auto"
    steps_per_execution: int = 1
    ema_momentum: float = 0.0
    ema_overwrite_every: int | None = None
    lookahead_every: int = 0
    lookahead_decay: float = 0.95
    lookahead_power: float = 3.0
    whiten_bias_epochs: int | None = None

    def __post_init__(self):
        # Checked here, when the config is read, so that a bad value fails before any data or run directory.
        for key, allowed in (("optimizer", OPTIMIZER_NAMES), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"Unknown {key}: expected one of {', '.join(allowed)}. "
                                  f"Received: {getattr(self, key)!r}")
        if self.whiten_bias_epochs is not None and (isinstance(self.whiten_bias_epochs, bool)
                                                    or not isinstance(self.whiten_bias_epochs, int)
                                                    or self.whiten_bias_epochs < 0):
            raise ConfigError(f"whiten_bias_epochs: expected null or an integer >= 0. "
                              f"Received: {self.whiten_bias_epochs!r}")
        check_ranges(None, self, (  # pretrain or finetune
            ("epochs", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
            ("learning_rate", lambda v: is_number(v) and v > 0, "a learning rate > 0"),
            ("momentum", lambda v: is_number(v) and 0 <= v < 1, "a momentum in [0, 1)"),
            ("weight_decay", lambda v: is_number(v) and v >= 0, "a weight decay >= 0"),
            ("label_smoothing", lambda v: is_number(v) and 0 <= v < 1, "a value in [0, 1)"),
            ("warmup_epochs", lambda v: is_number(v) and v >= 0, "a number of epochs >= 0"),
            ("early_stopping", lambda v: v is None or is_number(v, True) and v >= 1, "null or a patience >= 1"),
        ))
        check_steps_per_execution(self.steps_per_execution)
        if self.jit_compile not in ("auto", True, False):
            raise ConfigError(f"jit_compile: expected auto, true or false. Received: {self.jit_compile!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"nesterov: expected true or false. Received: {self.nesterov!r}")
        check_ranges(None, self, (
            ("ema_momentum", lambda v: is_number(v), "0 (off) or a momentum in (0, 1)"),
            ("lookahead_every", lambda v: is_number(v, True) and v >= 0, "0 (off) or an integer >= 1"),
            ("lookahead_decay", lambda v: is_number(v), "a factor in (0, 1)"),
            ("lookahead_power", lambda v: is_number(v), "a number"),
            ("start_factor", lambda v: is_number(v) and v >= 0, "a factor >= 0"),
            ("end_factor", lambda v: is_number(v) and v >= 0, "a factor >= 0"),
            ("ema_overwrite_every", lambda v: v is None or is_number(v, True) and v >= 1, "null or an integer >= 1"),
        ))
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum: expected 0 (off) or a momentum in (0, 1). "
                              f"Received: {self.ema_momentum!r}")
        if self.lookahead_every:
            check_lookahead(self.lookahead_every, self.lookahead_decay)
        if self.ema_momentum and self.lookahead_every:
            raise ConfigError(f"Expected at most one of ema_momentum and lookahead_every. "
                              f"Received: ema_momentum={self.ema_momentum!r}, lookahead_every={self.lookahead_every!r}")


def check_steps_per_execution(spe):
    """Raise a `ConfigError` unless ``spe`` is an integer >= 1, and 1 on the torch backend (Keras' torch
    trainer runs one step per call)."""
    if isinstance(spe, bool) or not isinstance(spe, int) or spe < 1:
        raise ConfigError(f"steps_per_execution: expected an integer >= 1. Received: {spe!r}")
    if spe > 1:
        import keras

        if keras.config.backend() == "torch":
            raise ConfigError(f"steps_per_execution: expected 1 on the torch backend (Keras' torch trainer runs "
                              f"one step per call; use JAX or TensorFlow for more). Received: {spe}")


def check_lookahead(every, decay):
    """Raise a `ConfigError` unless ``every >= 1`` and ``0 < decay < 1`` (see `keras_transfer.optim.Lookahead`)."""
    if int(every) < 1 or not 0.0 < decay < 1.0:
        raise ConfigError(f"Lookahead: expected every >= 1, 0 < decay < 1. Received: every={every!r}, "
                          f"decay={decay!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; written to ``config.yaml`` in the run directory.

    The defaults are the embedded offline job; its 20 pretraining and 50 fine-tuning epochs were chosen by
    ``experiments/study_main_job_recipe*.yaml`` (3 and 25 epochs lost to 1-nearest-neighbour on the raw pixels).
    The CIFAR-10 seed's recipe (SGD momentum 0.9,
    Nesterov, weight decay 5e-4, label smoothing 0.1, 5-epoch warmup then cosine; fine-tuning with
    Adam 1e-3, weight decay 1e-4, ReduceLROnPlateau) is ``experiments/cifar10_to_mnist.yaml``.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig(epochs=20, optimizer="adam", learning_rate=2e-3,
                                        label_smoothing=0.1, schedule="cosine", warmup_epochs=1)
    finetune: TrainConfig = TrainConfig(epochs=50)
    transfer: TransferConfig = TransferConfig()
    seed: int = 0

    def __post_init__(self):
        if not (is_number(self.seed, True) and 0 <= self.seed < 2**32):
            raise ConfigError(f"seed: expected an integer in [0, 2**32). Received: {self.seed!r}")
        check_train_last_k(self.model.name, self.transfer.train_last_k, self.transfer.freeze_until)
        check_surgical_block(get_spec(self.model.name).blocks, self.transfer.surgical_block)
        for section in ("pretrain", "finetune"):
            if getattr(self, section).whiten_bias_epochs is not None and self.model.name != "airbench":
                raise ConfigError(f"{section}.whiten_bias_epochs: expected model.name airbench (the only model with "
                                  f"a whitening bias). Received: model.name {self.model.name!r}")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "pretrain": TrainConfig,
            "finetune": TrainConfig, "transfer": TransferConfig}


def _coerce(cls, section, values):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"Unknown keys in [{section}]: expected some of {sorted(names)}. "
                          f"Received: {sorted(unknown)}")
    out = {}
    for k, v in values.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def merge(config, overrides, keep_none=False):
    """Return ``config`` with ``overrides`` applied: ``{"data": {...}, "seed": 1}``.

    None values are skipped (a command-line option not given), unless ``keep_none``: then they set the key to
    None, as ``null`` does in a YAML file (``data.per_class: null``, every training image)."""
    top = {}
    for key, value in overrides.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"Section [{key}]: expected a mapping of keys. Received: {value!r}")
            values = {k: v for k, v in value.items() if v is not None or keep_none}
            values = _coerce(SECTIONS[key], key, values)
            try:
                top[key] = dataclasses.replace(getattr(config, key), **values)
            except ConfigError as e:  # TrainConfig serves two sections: name the one at fault
                field = str(e).split(":", 1)[0]
                if SECTIONS[key] is TrainConfig and field in {f.name for f in dataclasses.fields(TrainConfig)}:
                    raise ConfigError(f"{key}.{e}") from None
                raise
        elif key == "seed":
            if value is not None:
                top["seed"] = value  # checked by RunConfig
        else:
            raise ConfigError(f"Unknown config section: expected {sorted(SECTIONS) + ['seed']}. "
                              f"Received: {key!r}")
    return dataclasses.replace(config, **top)


def read_yaml_mapping(path, what="YAML config file", holds="sections"):
    """The mapping in the YAML file at ``path``, or a one-line `ConfigError`: missing (or a directory), not
    YAML, not text, or not a mapping. ``what`` / ``holds`` name the file and its contents in the messages."""
    if not os.path.isfile(path):
        raise ConfigError(f"Expected an existing {what}. Received: {path!r}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: expected a YAML text file. Received: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {holds}. Received: {type(data).__name__}")
    return data


def load(path, base=None):
    """Read a YAML config file on top of ``base`` (default: `RunConfig()`)."""
    data = read_yaml_mapping(path)
    return merge(base or RunConfig(), data, keep_none=True)


def with_model(config, name):
    """``config`` with backbone ``name`` and, when it is another model than the config's, that model's own
    default input side and channels (the config's were chosen for its own model)."""
    spec = get_spec(name)
    if spec.name == config.model.name:
        return config
    return merge(config, {"model": {"name": spec.name, "input_size": spec.default_size, "channels": spec.channels}})


def weights_source(cfg):
    """What a fine-tuning run's backbone starts from instead of a pretraining stage: ``model.weights``
    (``imagenet`` or a weights file) when set and no pretrained model (``transfer.pretrained``) is given; else None."""
    w = cfg.model.weights
    return None if w in (None, "none") or cfg.transfer.pretrained else w


def needs_pretraining(cfg):
    """Whether a fine-tuning run pretrains on ``data.source`` first: not when it starts from a pretrained model
    (``transfer.pretrained``) or from weights (`weights_source`), nor when ``scratch`` is its only strategy (then
    nothing transfers and the backbone is built fresh for the target)."""
    return (cfg.transfer.pretrained is None and not weights_source(cfg)
            and set(cfg.transfer.strategies) != {"scratch"})


def weights_label(weights):
    """``ImageNet`` or the weights file's name, as the report names the source."""
    return "ImageNet" if weights == "imagenet" else os.path.basename(weights)


def absolute_path(path):
    return os.path.abspath(os.path.expanduser(path)) if path else path


def absolute_dataset(name):
    """``folder:PATH`` / ``npz:PATH`` with an absolute PATH; other names as they are."""
    if isinstance(name, str) and name.startswith(("folder:", "npz:")):
        kind, path = name.split(":", 1)
        return f"{kind}:{absolute_path(path)}"
    return name


def absolute_paths(config):
    """``config`` with its data root and dataset paths absolute, as recorded in a run directory (so
    ``evaluate``, ``gradcam`` and ``--resume`` find the data from any working directory)."""
    d = config.data
    return merge(config, {"data": {"data_dir": absolute_path(d.data_dir), "source": absolute_dataset(d.source),
                                   "target": absolute_dataset(d.target)}})


def to_dict(config):
    def plain(v):
        if isinstance(v, tuple):
            return [plain(i) for i in v]
        return v
    d = dataclasses.asdict(config)
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}


def save(config, path):
    from keras_transfer.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
