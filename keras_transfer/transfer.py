"""Transfer strategies, expressed as which named blocks of the backbone train.

BatchNorm (and the residual CNN's spatial dropout) in a frozen block run in
inference mode: Keras 3 runs a BatchNormalization whose ``trainable`` is False
with its moving statistics. Keras fixes the set of trainable variables at
``compile()`` on every backend, so callers must recompile after `apply_strategy`
(`keras_transfer.train.compile_model` does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_transfer.baselines import check_baselines
from keras_transfer.errors import ConfigError, check_ranges, is_number
from keras_transfer.models import get_spec

STRATEGIES = ("scratch", "linear", "partial", "full", "gradual", "lp-ft", "l2sp", "bss", "bitfit", "norm-only",
              "surgical")
# Strategies that train every block (the methods of `keras_transfer.methods` differ in what else they do).
_ALL_BLOCKS = ("scratch", "full", "lp-ft", "l2sp", "bss", "bitfit", "norm-only")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Which strategies to run and how.

    Attributes:
        strategies: tuple of str. Any of `STRATEGIES`.
        freeze_until: str or None. ``partial``: freeze blocks up to and including this one.
        train_last_k: int. ``partial`` when ``freeze_until`` is None: train the last k blocks.
        gradual_phases: int. ``gradual``: phases after the head-only one; each unfreezes
            one more block from the top.
        channel_mode: str. ``repeat`` (grey repeated to RGB) or ``conv`` (first conv
            summed over its RGB inputs so the backbone takes 1 channel).
        cached_features: bool. ``linear``: run the frozen backbone once over the data and
            train the head on the stored features (no augmentation), instead of running the
            backbone at every step.
        pretrained: str or None. A ``.keras`` model, or a run directory holding ``model.keras``, to
            start from instead of pretraining (``--pretrained``). Recorded so ``--resume`` and the
            report know where the backbone came from.
        backbone_lr: float. ``partial``, ``full`` and ``gradual``: learning-rate multiplier of the
            pretrained backbone's weights against the head's (discriminative fine-tuning; 1: the same
            rate). ``scratch`` (a fresh backbone) and ``linear`` (a frozen one) are not affected.
        layer_decay: float. With the same strategies, each backbone block ``d`` blocks below the head
            (the last block: ``d = 1``) trains at ``backbone_lr * layer_decay ** d`` times the head's
            learning rate, as timm's ``layer_decay`` (1: no decay). See `learning_rate_multipliers`.
        baselines: tuple of str. Classical baselines fitted on the target's raw pixels beside the strategies
            (`keras_transfer.baselines`: ``logreg``, ``knn``); empty for none.
        lp_epochs: int. ``lp-ft``: epochs of its linear probe (cached features) before the full fine-tuning
            (which takes the ``finetune`` recipe's epochs).
        l2sp_alpha, l2sp_beta: float. ``l2sp``: weight of ``||w - w0||^2`` over the pretrained backbone and of
            ``||w||^2`` over the new head's kernels (`keras_transfer.methods`).
        bss_eta, bss_k: ``bss``: weight of the ``k`` smallest squared singular values of a batch's features.
        surgical_block: str. ``surgical``: the one block that trains (``first``, ``middle``, ``last`` or its name).
    """

    strategies: tuple = ("scratch", "linear", "partial", "full")
    freeze_until: str | None = None
    train_last_k: int = 1
    gradual_phases: int = 2
    channel_mode: str = "repeat"
    cached_features: bool = False
    pretrained: str | None = None
    backbone_lr: float = 1.0
    layer_decay: float = 1.0
    baselines: tuple = ("logreg", "knn")
    lp_epochs: int = 25
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    bss_eta: float = 0.001
    bss_k: int = 1
    surgical_block: str = "first"

    def __post_init__(self):  # checked here, so bad values are refused before any run directory
        if not isinstance(self.strategies, tuple) or not self.strategies:
            raise ConfigError(f"transfer.strategies: expected a non-empty list of strategies. "
                              f"Received: {self.strategies!r}")
        if not isinstance(self.baselines, tuple):
            raise ConfigError(f"transfer.baselines: expected a list (empty for none). Received: {self.baselines!r}")
        check_baselines(self.baselines)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"Unknown strategy: expected some of {STRATEGIES}. Received: {s!r}")
        if self.channel_mode not in ("repeat", "conv"):
            raise ConfigError(f"Unknown channel_mode: expected repeat or conv. Received: {self.channel_mode!r}")
        if not isinstance(self.cached_features, bool):
            raise ConfigError(f"transfer.cached_features: expected true or false. Received: {self.cached_features!r}")
        check_ranges("transfer", self, (
            ("gradual_phases", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
            ("backbone_lr", lambda v: is_number(v) and v > 0, "a learning-rate multiplier > 0"),
            ("layer_decay", lambda v: is_number(v) and 0 < v <= 1, "a factor in (0, 1]"),
            ("lp_epochs", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
            ("l2sp_alpha", lambda v: is_number(v) and v >= 0, "a penalty weight >= 0"),
            ("l2sp_beta", lambda v: is_number(v) and v >= 0, "a penalty weight >= 0"),
            ("bss_eta", lambda v: is_number(v) and v >= 0, "a penalty weight >= 0"),
            ("bss_k", lambda v: is_number(v, True) and v >= 1, "an integer >= 1"),
        ))
        if not isinstance(self.surgical_block, str):
            raise ConfigError(f"transfer.surgical_block: expected first, middle, last or a block name. "
                              f"Received: {self.surgical_block!r}")

    def lr_scales(self, strategy):
        """``(backbone_lr, layer_decay)`` for ``strategy``, or None where the backbone trains at the
        head's rate (``scratch``, ``linear``, or both factors 1)."""
        if strategy in ("scratch", "linear") or (self.backbone_lr, self.layer_decay) == (1, 1):
            return None
        return float(self.backbone_lr), float(self.layer_decay)


def backbone_of(model):
    return model.get_layer("backbone")


def trainable_blocks(spec_name, strategy, freeze_until=None, train_last_k=1, surgical_block="first"):
    """The set of backbone blocks that train under ``strategy`` (``lp-ft``: its fine-tuning phase; ``bitfit`` and
    ``norm-only``: all blocks, of which `keras_transfer.methods.freeze_variables` freezes single weights)."""
    from keras_transfer.methods import check_surgical_block

    blocks = get_spec(spec_name).blocks
    if strategy in _ALL_BLOCKS:
        return set(blocks)
    if strategy == "linear":
        return set()
    if strategy == "surgical":
        return {check_surgical_block(blocks, surgical_block)}
    if strategy == "partial":
        if freeze_until is not None:
            if freeze_until not in blocks:
                raise ConfigError(f"Unknown block for freeze_until: expected one of {list(blocks)}. "
                                  f"Received: {freeze_until!r}")
            return set(blocks[blocks.index(freeze_until) + 1:])
        check_train_last_k(spec_name, train_last_k)
        return set(blocks[len(blocks) - train_last_k:])  # 0: none (the head alone, as linear)
    raise ConfigError(f"Unknown strategy: expected one of {STRATEGIES}. Received: {strategy!r}")


def check_train_last_k(spec_name, k, freeze_until=None):
    """Raise a `ConfigError` unless ``k`` is a block count of ``spec_name`` (0: the head alone) and
    ``freeze_until`` (if given) one of its blocks."""
    blocks = get_spec(spec_name).blocks
    if not (is_number(k, True) and 0 <= k <= len(blocks)):
        raise ConfigError(f"transfer.train_last_k: expected an integer in 0..{len(blocks)} (the blocks of "
                          f"{spec_name}). Received: {k!r}")
    if freeze_until is not None and freeze_until not in blocks:
        raise ConfigError(f"transfer.freeze_until: expected one of {list(blocks)}. Received: {freeze_until!r}")


def set_trainable_blocks(model, spec_name, train_blocks):
    """Freeze every backbone layer outside ``train_blocks`` and the model's fixed layers; everything else
    trains."""
    spec = get_spec(spec_name)
    model.trainable = True
    backbone = backbone_of(model)
    for layer_name, block in spec.layer_blocks(backbone).items():
        backbone.get_layer(layer_name).trainable = block in train_blocks and layer_name not in spec.fixed_layers
    return model


def apply_strategy(model, spec_name, strategy, freeze_until=None, train_last_k=1, surgical_block="first"):
    """Set ``trainable`` flags for a strategy (``gradual`` starts head-only; ``lp-ft`` is set for its fine-tuning
    phase). Recompile after."""
    from keras_transfer.methods import VARIABLE_LEVEL, freeze_variables

    if strategy == "gradual":
        return set_trainable_blocks(model, spec_name, set())
    set_trainable_blocks(model, spec_name,
                         trainable_blocks(spec_name, strategy, freeze_until, train_last_k, surgical_block))
    if strategy in VARIABLE_LEVEL:
        freeze_variables(backbone_of(model), strategy)
    return model


def block_lr_factors(spec_name, backbone_lr=1.0, layer_decay=1.0):
    """``{block: backbone_lr * layer_decay ** d}``, ``d`` the block's distance below the head (the
    backbone's last block: ``d = 1``), in block order from the input."""
    blocks = get_spec(spec_name).blocks
    return {block: float(backbone_lr * layer_decay ** (len(blocks) - i)) for i, block in enumerate(blocks)}


def learning_rate_multipliers(model, spec_name, backbone_lr=1.0, layer_decay=1.0):
    """Learning-rate multipliers of the backbone's trainable weights, ``{variable path: multiplier}``
    (`keras_transfer.optim.LRMultipliers`): each block's weights get its `block_lr_factors`; weights outside the
    backbone (the head) are left out, so train at the optimizer's rate. Frozen weights are left out too:
    call after `set_trainable_blocks`, before compiling. Empty when both factors are 1."""
    if backbone_lr == 1 and layer_decay == 1:
        return {}
    factors = block_lr_factors(spec_name, backbone_lr, layer_decay)
    backbone = backbone_of(model)
    out = {}
    for layer_name, block in get_spec(spec_name).layer_blocks(backbone).items():
        for v in backbone.get_layer(layer_name).trainable_weights:
            out[v.path] = factors[block]
    backbone_ids = {id(v) for v in backbone.weights}
    shared = {v.path for v in model.trainable_weights if id(v) not in backbone_ids} & set(out)
    if shared:  # the optimizer tells weights apart by path
        raise ConfigError(f"Learning-rate multipliers: expected backbone weight paths that no head weight has. "
                          f"Received: {sorted(shared)[:3]}")
    return out


def gradual_schedule(spec_name, phases):
    """Trainable block sets for gradual unfreezing: head only, then one more block per phase."""
    blocks = get_spec(spec_name).blocks
    return [set(blocks[len(blocks) - k:]) if k else set() for k in range(min(phases, len(blocks)) + 1)]


def parameter_counts(model):
    """``(trainable, non_trainable)`` parameter counts of a model."""
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    frozen = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
    return trainable, frozen


def features_tensor(model):
    """The backbone's output inside the classifier graph (the input of the first head layer)."""
    from keras_transfer.models import head_layers

    return head_layers(model)[0].input


def feature_extractor(model):
    """The classifier up to the backbone's output: preprocessing + backbone, for cached features."""
    import keras

    from keras_transfer import accel

    # the torch fast path for the feature pass too (the backbone's layers are ``model``'s: they keep it)
    return accel.apply(keras.Model(model.input, features_tensor(model), name="feature_extractor"))


def feature_statistics(features):
    """``(mean, variance)`` of each column of ``features``, the backbone's output on the training images
    (``feature_extractor(model).predict(x)``: inference mode, no augmentation).

    The variance has a floor of 0.1% of the mean feature variance, so that a feature that is (nearly)
    constant on the training images is not scaled up without bound on other images. A linear probe trains its head
    on features standardised with these (``build_classifier(feature_stats=...)``), as MAE's probe
    does with an affine-free BatchNorm: a fixed affine map of frozen features, which leaves the
    probe's capacity as it is but makes its learning rate independent of the backbone's feature
    scale (airbench's CIFAR-10 features have a standard deviation near 0.07, and the default recipe's
    120 Adam steps took a probe on 100 MNIST images to 0.26 validation accuracy on raw features
    against 0.60 on standardised ones).
    """
    f = np.asarray(features, "float64")
    variance = f.var(0)
    return f.mean(0), variance + 1e-3 * variance.mean() + 1e-12


def head_model(model):
    """A model of the classifier's head layers alone, sharing their weights with ``model``."""
    import keras

    from keras_transfer.models import head_layers

    features = keras.Input(features_tensor(model).shape[1:], name="features")
    x = features
    for layer in head_layers(model):
        x = layer(x)
    return keras.Model(features, x, name="head")
