"""Compile and fit: optimizers, schedules, losses, callbacks, checkpoints and resume."""

from __future__ import annotations

import csv
import math
import os
import time

import keras
import numpy as np
from keras import ops

from keras_transfer import rundir
from keras_transfer.backend import avoid_device_syncs
from keras_transfer.config import PRECISIONS, SCHEDULES, check_lookahead
from keras_transfer.data.pipeline import fit_input
from keras_transfer.errors import ConfigError
from keras_transfer.io import atomic_write_text, load_model, read_json, read_model_extra, save_model
from keras_transfer.models.fast import use_channels_last_kernels
from keras_transfer.models.graph import use_direct_calls


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


def compile_model(model, cfg, steps_per_epoch, lr_multipliers=None):
    """Compile (or recompile, after a change of ``trainable``) with the recipe ``cfg``; ``lr_multipliers``:
    ``{variable path: factor}`` for weights that train at another rate (`LRMultipliers`)."""
    # "auto" is Keras' own rule: XLA on JAX, on TensorFlow only with an accelerator (on a CPU, XLA ran
    # EfficientNetB0 7-10x and the residual CNN 1.1-1.5x slower than TF's own kernels; see
    # benchmarks/), never torch.compile on torch (minutes per model; slower than eager on a GPU).
    jit = cfg.jit_compile if cfg.jit_compile == "auto" else bool(cfg.jit_compile)
    use_direct_calls(model)  # torch: eager steps skip Keras' per-layer __call__ (models/graph.py)
    avoid_device_syncs()  # torch: numbers and seeds without host-device synchronisation (backend.py)
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch, lr_multipliers),
        loss=SparseSmoothedCrossentropy(cfg.label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit,
        steps_per_execution=cfg.steps_per_execution,
    )
    use_channels_last_kernels(model)  # torch eager: kernels in the order the convolutions read them (backend.py)
    return model


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_time`` (seconds) to the logs of each epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_time"] = time.perf_counter() - self._t


class LearningRateLog(keras.callbacks.Callback):
    """Adds ``learning_rate`` to the logs of each epoch: the optimizer's rate when the epoch ends (a
    schedule's value at the step count reached; with ``ReduceLROnPlateau``, the rate before any cut it
    makes at that epoch's end)."""

    def on_epoch_end(self, epoch, logs=None):
        rate = getattr(self.model.optimizer, "learning_rate", None)
        if logs is not None and rate is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))


class EpochProgress(keras.callbacks.Callback):
    """Echoes one line for an epoch when ``min_interval`` seconds have passed since the last line (or the
    start), so a long run shows it is alive and how it learns, and a run of short epochs stays quiet.

    Epoch-level only: a batch-end hook would make Keras read every step's logs, a host-device wait per
    step on an accelerator.
    """

    KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self, echo, label="", min_interval=10.0):
        super().__init__()
        self.echo, self.label, self.min_interval = echo, label, min_interval

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if now - self._last < self.min_interval:
            return
        self._last = now
        logs = logs or {}
        values = ", ".join(f"{k} {float(logs[k]):.4f}" for k in self.KEYS if k in logs)
        took = f" ({logs['epoch_time']:.1f} s)" if "epoch_time" in logs else ""
        self.echo(f"  {self.label}epoch {epoch + 1}/{self.params['epochs']}: {values}{took}")


RESUME_STATE = "resume.json"  # in last.keras: {"epoch": the epoch it ends, "plateau": ...}
RNG_IN_CHECKPOINT = "rng.npz"  # in last.keras: the random-generator states (`SeedState`)


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save ``best.keras`` on a better ``monitor`` value, then ``last.keras`` every epoch.

    Each file is written to a temp name and renamed, so a crash never leaves a half-written checkpoint.
    ``last.keras`` holds everything a resume needs, in the one file that is replaced at once: the optimizer
    state, the epoch it ends (`RESUME_STATE`), the random-generator states (`SeedState`) and the plateau
    schedule's state (``plateau``: a `ResumablePlateau`, which must run before this callback). A process killed
    at any instant leaves a ``last.keras`` whose parts agree; the history rows after it are cut on resume
    (`resume_state`). ``best.keras`` is written first, so it never misses an epoch ``last.keras`` has.
    """

    def __init__(self, directory, monitor="val_accuracy", best=-math.inf, plateau=None):
        super().__init__()
        self.directory, self.monitor, self.plateau = directory, monitor, plateau
        self.best = best  # a resumed stage's best so far, so best.keras is not replaced by a worse epoch

    def on_epoch_end(self, epoch, logs=None):
        import io
        import json

        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = value
            save_model(self.model, os.path.join(self.directory, rundir.BEST))
        state = {"epoch": int(epoch)}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state()
        buf = io.BytesIO()
        np.savez(buf, *[keras.ops.convert_to_numpy(s.value) for s in SeedState.states(self.model)])
        save_model(self.model, os.path.join(self.directory, rundir.LAST),
                   extra={RESUME_STATE: json.dumps(state), RNG_IN_CHECKPOINT: buf.getvalue()})


def checkpoint_state(stage_dir):
    """What `AtomicCheckpoint` wrote into the stage's ``last.keras`` beside the model (None for a checkpoint
    of an earlier version, which kept it in side files)."""
    import json

    data = read_model_extra(rundir.checkpoint_path(stage_dir), RESUME_STATE)
    return json.loads(data) if data is not None else None


class ResumablePlateau(keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` whose state (the best value so far, the epochs waited, the cooldown)
    is saved in each ``last.keras`` (`AtomicCheckpoint`, which runs after it, so the checkpoint holds the rate of
    the next epoch) and read back when a stage resumes, so a resumed stage cuts its learning rate at the epoch an
    uninterrupted one does (Keras' callback starts afresh in every ``fit``).

    ``stage_dir``: the stage whose checkpoint holds the state; ``restore``: take it up at the beginning (a stage
    resumed, not a gradual phase begun); ``epoch``: the epoch the checkpoint must end for its state to be taken.
    """

    def __init__(self, stage_dir, restore=False, epoch=-1, **kwargs):
        super().__init__(**kwargs)
        self.stage_dir, self.restore_on_begin, self.resume_epoch = stage_dir, restore, epoch

    def state(self):
        return {"best": float(self.best), "wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter)}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.restore_on_begin:
            return
        saved = checkpoint_state(self.stage_dir)
        if saved is not None and saved.get("epoch") == self.resume_epoch and "plateau" in saved:
            state = saved["plateau"]
        else:  # a checkpoint of an earlier version: the side file, if it was written for the same epoch
            legacy = rundir.plateau_state_path(self.stage_dir)
            state = read_json(legacy) if os.path.exists(legacy) else {}
            if state.get("epoch") != self.resume_epoch:
                return
        self.best, self.wait, self.cooldown_counter = state["best"], state["wait"], state["cooldown_counter"]


class SeedState(keras.callbacks.Callback):
    """Restores the random-generator states of the model (dropout, augmentation) when a stage resumes.

    ``.keras`` files do not hold `keras.random.SeedGenerator` states: `AtomicCheckpoint` saves them into
    ``last.keras`` beside the model; restoring them on resume makes a resumed run draw the same masks as an
    uninterrupted one. ``stage_dir``: the stage whose checkpoint holds them.
    """

    def __init__(self, stage_dir, restore=False):
        super().__init__()
        self.stage_dir, self.restore_on_begin = stage_dir, restore

    def on_train_begin(self, logs=None):
        # Restored here, not at load time: Keras' first build of the train step (torch) draws
        # from the generators before training starts.
        if self.restore_on_begin:
            data = read_model_extra(rundir.checkpoint_path(self.stage_dir), RNG_IN_CHECKPOINT)
            if data is None:  # a checkpoint of an earlier version: the side file
                self.restore(self.model, rundir.rng_state_path(self.stage_dir))
            else:
                import io

                self.restore(self.model, io.BytesIO(data))

    @staticmethod
    def states(model):
        seen, out = set(), []
        for layer in model._flatten_layers(include_self=True, recursive=True):
            for sg in getattr(layer, "_seed_generators", []):
                if id(sg) not in seen:
                    seen.add(id(sg))
                    out.append(sg.state)
        return out

    @classmethod
    def restore(cls, model, path):
        """Assign the states saved in ``path`` (a file, or a file object) to ``model``'s generators."""
        if isinstance(path, str) and not os.path.exists(path):
            return
        with np.load(path) as f:
            values = [f[f"arr_{i}"] for i in range(len(f.files))]
        for var, value in zip(cls.states(model), values):
            var.assign(value)


def read_history(path):
    """Rows of a CSVLogger file as a dict of lists (floats)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        for k, v in r.items():
            out.setdefault(k, []).append(float(v) if v not in ("", "NA", None) else float("nan"))
    return out


class FreezeBias(keras.callbacks.Callback):
    """Holds freezable `keras_transfer.models.airbench.Bias` layers fixed from epoch ``epochs`` on
    (airbench94 trains its whitening bias for 3 epochs), and lets them train again when ``fit`` ends,
    so the saved model holds the value used since and fine-tunes normally.

    Args:
        layers: list of freezable ``Bias`` layers.
        epochs: int. Number of epochs they train first.
    """

    def __init__(self, layers, epochs):
        super().__init__()
        self.bias_layers, self.epochs = list(layers), int(epochs)

    @classmethod
    def for_model(cls, model, epochs, name="whiten_bias"):
        """The callback for every freezable Bias layer called ``name`` in ``model`` (nested models too)."""
        found = [layer for layer in _all_layers(model) if layer.name == name and getattr(layer, "freezable", False)]
        if not found:
            raise ConfigError(f"whiten_bias_epochs: expected a model with a freezable {name!r} layer (airbench). "
                              f"Received: {model.name!r} without one")
        return cls(found, epochs)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.epochs:  # idempotent, so a run resumed after the freeze keeps the held value
            for layer in self.bias_layers:
                layer.freeze()

    def on_train_end(self, logs=None):
        for layer in self.bias_layers:
            layer.unfreeze()


class HistoryLogger(keras.callbacks.CSVLogger):
    """``keras.callbacks.CSVLogger`` that, appending to a history with a header, keeps that header's
    columns: a run begun by an earlier version (no ``learning_rate`` column) resumes into a file that
    still reads, where Keras would write rows of more values than the header names."""

    def on_train_begin(self, logs=None):
        header = None
        if self.append and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
        super().on_train_begin(logs)
        if header and header[0] == "epoch":
            self.keys = header[1:]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def fit(model, train, val, cfg, stage_dir, initial_epoch=0, epochs=None, verbose=0, extra_callbacks=(),
        resume_schedule=None):
    """Fit with checkpoints, CSV history and the recipe's callbacks.

    Args:
        model: compiled keras.Model.
        train, val: inputs for ``fit`` (see `keras_transfer.data.pipeline.make_input`); ``val`` may be None.
        cfg: TrainConfig.
        stage_dir: str. Receives ``history.csv``, ``checkpoints/{last,best}.keras``.
        initial_epoch: int. Epoch to start from (resume or gradual phases).
        epochs: int or None. Epoch to stop at (default ``cfg.epochs``).
        resume_schedule: bool or None. Whether the plateau schedule takes up the state it saved at epoch
            ``initial_epoch - 1`` (a stage resumed in the middle); None: when ``initial_epoch > 0``. A gradual
            phase that begins (not resumes) at a later epoch starts its schedule afresh, as its new optimizer does.
    """
    os.makedirs(stage_dir, exist_ok=True)
    ckpt = os.path.join(stage_dir, rundir.CHECKPOINTS)
    resumed = initial_epoch > 0
    earlier = read_history(rundir.history_path(stage_dir)).get("val_accuracy", [])[:initial_epoch] if resumed else []
    restore = resumed if resume_schedule is None else resume_schedule
    plateau = [ResumablePlateau(stage_dir, restore, initial_epoch - 1, monitor="val_loss",
                                factor=0.5, patience=2, min_lr=1e-6)] if cfg.schedule == "plateau" else []
    # The history row is written before the checkpoint, so a kill between the two leaves a row too many, which
    # `resume_state` cuts, never a row missing.
    callbacks = [EpochTimer(), LearningRateLog(), *plateau,
                 SeedState(stage_dir, resumed),
                 HistoryLogger(rundir.history_path(stage_dir), append=resumed),
                 AtomicCheckpoint(ckpt, best=max((v for v in earlier if v == v), default=-math.inf),
                                  plateau=plateau[0] if plateau else None),
                 *extra_callbacks]
    if cfg.whiten_bias_epochs is not None:
        callbacks.append(FreezeBias.for_model(model, cfg.whiten_bias_epochs))
    if cfg.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping("val_accuracy", patience=cfg.early_stopping,
                                                       mode="max", restore_best_weights=True))
    # CSVLogger must see epoch_time and learning_rate: EpochTimer and LearningRateLog, which run first, add them.
    # shuffle=False: the input (ArrayBatches, tf.data) shuffles itself, seeded per epoch; Keras' own
    # batch-order shuffle on torch would draw from torch's global RNG and break resume equality.
    train, follow = fit_input(train)
    val = fit_input(val)[0] if val is not None else None
    history = model.fit(train, validation_data=val, epochs=epochs or cfg.epochs, initial_epoch=initial_epoch,
                        callbacks=follow + callbacks, verbose=verbose, shuffle=False)
    if getattr(model.optimizer, "use_ema", False):
        # fit ends by assigning the moving averages to the weights; on JAX a weight and its average
        # then share one buffer, which the next jitted call donates, so saving the optimizer failed
        # with "Array has been deleted". Fresh copies keep the two apart.
        for v in model.trainable_variables:
            v.assign(keras.ops.copy(v))
    return history


def resume_state(stage_dir):
    """``(model, next_epoch)`` from a stage's ``checkpoints/last.keras`` and ``history.csv``."""
    last = rundir.checkpoint_path(stage_dir)
    if not os.path.exists(last):
        raise ConfigError(f"Cannot resume: expected {last}. Received: no checkpoint in {stage_dir}")
    avoid_device_syncs()
    import zipfile

    try:
        with zipfile.ZipFile(last) as z:  # a .keras file is a zip archive: a truncated one fails here
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        bad = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if bad:
        raise ConfigError(f"Cannot resume: expected a Keras model file at {last} (the stage's last checkpoint; remove "
                          f"it to restart the stage). Received: a damaged file ({bad})")
    try:
        model = load_model(last)
    except Exception as e:  # noqa: BLE001 - e.g. a checkpoint of another version: say so, do not call it damaged
        raise ConfigError(f"Cannot resume: expected {last} to load with this version of keras-transfer and Keras. "
                          f"Received: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    model = use_direct_calls(model)  # fit() restores the RNG states saved in the checkpoint
    use_channels_last_kernels(model)  # torch eager: as compile_model lays them out, optimizer slots too
    path = rundir.history_path(stage_dir)
    state = checkpoint_state(stage_dir)
    if state is None:  # a checkpoint of an earlier version: the history's rows say where it ended
        return model, len(read_history(path).get("epoch", []))
    start = state["epoch"] + 1
    _cut_history(path, start)
    return model, start


def _cut_history(path, rows):
    """Keep the header and the first ``rows`` rows of a history file: the rows a process killed after writing
    them and before its checkpoint left (and a last line it did not finish) are not the checkpoint's."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith(("\n", "\r"))]
    if len(complete) != len(lines) or len(complete) > rows + 1:
        atomic_write_text(path, "".join(complete[:rows + 1]))
