"""Optimizers, learning-rate schedules, the loss and precision: what ``compile`` is given
(`keras_transfer.train.compile_model`)."""

from __future__ import annotations

import keras
from keras import ops

from keras_transfer.config import PRECISIONS, SCHEDULES, check_lookahead
from keras_transfer.errors import ConfigError


@keras.saving.register_keras_serializable(package="keras_transfer")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels and logits, with label smoothing."""

    def __init__(self, label_smoothing=0.0, name="sparse_smoothed_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        n = ops.shape(y_pred)[-1]
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(onehot, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def set_precision(precision):
    """Set the global dtype policy before building models."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision: expected one of {', '.join(PRECISIONS)}. Received: {precision!r}")
    keras.config.set_dtype_policy(precision)


@keras.saving.register_keras_serializable(package="keras_transfer")
class TriangularSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise linear per step: ``start`` -> ``peak`` over ``warmup_steps``, then -> ``end`` at ``total_steps``."""

    def __init__(self, start, peak, end, warmup_steps, total_steps):
        self.start, self.peak, self.end = float(start), float(peak), float(end)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = self.start + (self.peak - self.start) * step / max(self.warmup_steps, 1)
        frac = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        down = self.peak + (self.end - self.peak) * ops.minimum(frac, 1.0)
        return ops.where(step < self.warmup_steps, up, down)

    def get_config(self):
        return {"start": self.start, "peak": self.peak, "end": self.end, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}


def learning_rate(cfg, steps_per_epoch):
    if cfg.schedule == "triangle":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
        return TriangularSchedule(cfg.start_factor * cfg.learning_rate, cfg.learning_rate,
                                  cfg.end_factor * cfg.learning_rate, warmup, total)
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, alpha=0.0, warmup_target=cfg.learning_rate, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, total)
    if cfg.schedule in ("plateau", "constant"):
        return cfg.learning_rate
    raise ConfigError(f"Unknown schedule: expected one of {', '.join(SCHEDULES)}. Received: {cfg.schedule!r}")


class Lookahead:
    """Mixin for a Keras optimizer: airbench94's Lookahead with a ramped pull-back.

    Every ``every`` steps the stored average moves towards the weights,
    ``average = rho * average + (1 - rho) * weights``, and the weights are set to the average, with
    ``rho = decay ** every * (step / total_steps) ** power``: almost no averaging early (fast
    progress), strong averaging at the end. Training ends on the average. It reuses the optimizer's
    EMA machinery (``use_ema``) inside the compiled train step and pulls back with a select, so it
    costs no host round trip on any backend. Unlike airbench94 it averages the trainable weights
    only (not BatchNorm statistics) and starts at step 0 rather than epoch 3, where its ``rho`` is
    below 0.03 anyway.
    """

    def __init__(self, *args, lookahead_every=5, lookahead_decay=0.95, lookahead_power=3.0, total_steps=1,
                 **kwargs):
        for key in ("use_ema", "ema_momentum", "ema_overwrite_frequency"):  # from get_config on reload
            kwargs.pop(key, None)
        check_lookahead(lookahead_every, lookahead_decay)
        if int(total_steps) < 1:
            raise ConfigError(f"Lookahead: expected total_steps >= 1. Received: {total_steps!r}")
        # Keras' ema_overwrite_frequency would pull back through ops.cond, which on torch reads its
        # predicate on the host (a host-device synchronisation per step); the update below selects instead.
        super().__init__(*args, use_ema=True, ema_momentum=lookahead_decay, ema_overwrite_frequency=None, **kwargs)
        self.lookahead_every, self.lookahead_decay = int(lookahead_every), float(lookahead_decay)
        self.lookahead_power, self.total_steps = float(lookahead_power), int(total_steps)

    def lookahead_rho(self, step):
        """The pull-back factor at 1-based ``step`` (a tensor)."""
        frac = ops.minimum(ops.cast(step, "float32") / self.total_steps, 1.0)
        return self.lookahead_decay ** self.lookahead_every * frac ** self.lookahead_power

    def _update_model_variables_moving_average(self, trainable_variables):
        step = self.iterations + 1  # the weights are overwritten after this update where step % every == 0
        due = ops.equal(ops.mod(step, self.lookahead_every), 0)
        rho = ops.where(ops.equal(self.iterations, 0), 0.0, ops.where(due, self.lookahead_rho(step), 1.0))
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                r = ops.cast(rho, var.dtype)
                average.assign(r * average + (1 - r) * var)
                var.assign(ops.where(due, average.value, var.value))  # the pull-back, every ``every`` steps

    def get_config(self):
        return {**super().get_config(), "lookahead_every": self.lookahead_every,
                "lookahead_decay": self.lookahead_decay, "lookahead_power": self.lookahead_power,
                "total_steps": self.total_steps}


class AverageOverwrite:
    """Mixin for a Keras optimizer: Keras' moving average of the weights (``use_ema``, ``ema_momentum``),
    overwriting the weights with it every ``ema_overwrite_every`` steps by a select inside the average
    update.

    Keras' own ``ema_overwrite_frequency`` overwrites through ``ops.cond``, whose predicate torch reads
    on the host every step: a host-device synchronisation per step on a GPU. Same averages, same steps
    and same values on every backend (tested against Keras' option).
    """

    def __init__(self, *args, ema_overwrite_every=1, **kwargs):
        for key in ("use_ema", "ema_overwrite_frequency"):  # from get_config on reload
            kwargs.pop(key, None)
        if int(ema_overwrite_every) < 1:
            raise ConfigError(f"ema_overwrite_every: expected an integer >= 1. Received: {ema_overwrite_every!r}")
        super().__init__(*args, use_ema=True, ema_overwrite_frequency=None, **kwargs)
        self.ema_overwrite_every = int(ema_overwrite_every)

    def _update_model_variables_moving_average(self, trainable_variables):
        super()._update_model_variables_moving_average(trainable_variables)
        due = ops.equal(ops.mod(self.iterations + 1, self.ema_overwrite_every), 0)  # Keras' rule
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                var.assign(ops.where(due, average.value, var.value))

    def get_config(self):
        return {**super().get_config(), "ema_overwrite_every": self.ema_overwrite_every}


class LRMultipliers:
    """Mixin for a Keras optimizer: per-weight learning-rate multipliers, torch's parameter groups.

    ``lr_multipliers`` maps variable paths (``variable.path``) to a factor; every other variable trains
    at the optimizer's rate. Each group's update step runs with ``factor * learning_rate`` (whatever the
    schedule gives at that step) and its decoupled weight decay with the same factor, so a group at 0.1
    moves as if the whole optimizer had a tenth of the rate, with SGD, momentum or Adam alike. Used for
    discriminative fine-tuning (`keras_transfer.transfer.learning_rate_multipliers`). Kept in the
    optimizer's config, so a saved model resumes with its groups.
    """

    def __init__(self, *args, lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        bad = {k: v for k, v in self.lr_multipliers.items() if not v > 0}
        if bad:
            raise ConfigError(f"lr_multipliers: expected factors > 0. Received: {bad}")

    def _groups(self, variables):
        """``{factor: [indices into variables]}``, in the order of first appearance."""
        groups = {}
        for i, v in enumerate(variables):
            groups.setdefault(self.lr_multipliers.get(v.path, 1.0), []).append(i)
        return groups

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        for factor, idx in self._groups(trainable_variables).items():
            super()._backend_update_step([grads[i] for i in idx], [trainable_variables[i] for i in idx],
                                         learning_rate if factor == 1.0 else learning_rate * factor)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for factor, idx in self._groups(variables).items():
            group = [variables[i] for i in idx]
            if factor == 1.0:
                super()._apply_weight_decay(group)
                continue
            for v in group:
                if self._use_weight_decay(v):
                    rate = ops.cast(self.learning_rate, v.dtype) * ops.cast(self.weight_decay * factor, v.dtype)
                    v.assign(v - v * rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers)}


def _with(mixins, optimizer):
    """``mixins`` (one class or a tuple) on a Keras ``optimizer`` class, named after them
    (``LookaheadSGD``, ``LookaheadLRMultipliersAdam``) and registered for saving under that name."""
    mixins = mixins if isinstance(mixins, tuple) else (mixins,)
    names = "".join(m.__name__ for m in mixins)
    cls = type(names + optimizer.__name__, (*mixins, optimizer),
               {"__doc__": f"``keras.optimizers.{optimizer.__name__}`` with "
                           f"{' and '.join(f'`{m.__name__}`' for m in mixins)}.",
                "__module__": __name__})
    return keras.saving.register_keras_serializable(package="keras_transfer")(cls)


_KERAS_OPTIMIZERS = (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW)
LookaheadSGD, LookaheadAdam, LookaheadAdamW = (_with(Lookahead, o) for o in _KERAS_OPTIMIZERS)
AverageOverwriteSGD, AverageOverwriteAdam, AverageOverwriteAdamW = (_with(AverageOverwrite, o)
                                                                    for o in _KERAS_OPTIMIZERS)


# name -> (Keras optimizer, the same with `Lookahead`, with `AverageOverwrite`); the names are
# config.OPTIMIZER_NAMES, which TrainConfig checks.
OPTIMIZERS = {"sgd": (keras.optimizers.SGD, LookaheadSGD, AverageOverwriteSGD),
              "adam": (keras.optimizers.Adam, LookaheadAdam, AverageOverwriteAdam),
              "adamw": (keras.optimizers.AdamW, LookaheadAdamW, AverageOverwriteAdamW)}
# The same three each with `LRMultipliers`, used only when some weight has a factor other than 1 (on torch,
# Keras' own SGD / Adam / AdamW update all weights in a few fused `_foreach_` operators; a subclass does not).
WITH_LR_MULTIPLIERS = {name: (_with(LRMultipliers, plain), _with((Lookahead, LRMultipliers), plain),
                              _with((AverageOverwrite, LRMultipliers), plain))
                       for name, plain in zip(OPTIMIZERS, _KERAS_OPTIMIZERS)}


def make_optimizer(cfg, steps_per_epoch, lr_multipliers=None):
    """The optimizer of recipe ``cfg``; ``lr_multipliers``: ``{variable path: factor}`` (`LRMultipliers`)."""
    lr = learning_rate(cfg, steps_per_epoch)
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer: expected one of {', '.join(OPTIMIZERS)}. Received: {cfg.optimizer!r}")
    lr_multipliers = {k: v for k, v in (lr_multipliers or {}).items() if v != 1}
    plain, with_lookahead, with_overwrite = (WITH_LR_MULTIPLIERS if lr_multipliers else OPTIMIZERS)[cfg.optimizer]
    kwargs = {"momentum": cfg.momentum, "nesterov": cfg.nesterov} if cfg.optimizer == "sgd" else {}
    if lr_multipliers:
        kwargs["lr_multipliers"] = lr_multipliers
    kwargs["weight_decay"] = cfg.weight_decay if cfg.optimizer == "adamw" else (cfg.weight_decay or None)
    if cfg.lookahead_every:
        return with_lookahead(lr, lookahead_every=cfg.lookahead_every, lookahead_decay=cfg.lookahead_decay,
                              lookahead_power=cfg.lookahead_power, total_steps=max(1, cfg.epochs * steps_per_epoch),
                              **kwargs)
    if cfg.ema_momentum and cfg.ema_overwrite_every:
        return with_overwrite(lr, ema_momentum=cfg.ema_momentum, ema_overwrite_every=cfg.ema_overwrite_every, **kwargs)
    if cfg.ema_momentum:
        kwargs.update(use_ema=True, ema_momentum=cfg.ema_momentum)
    return plain(lr, **kwargs)
