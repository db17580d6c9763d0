"""The callbacks of ``fit`` (`keras_transfer.train.fit`): timing, progress, the learning-rate log, checkpoints that
hold everything a resume needs, the plateau schedule and random-generator states a resume takes up, the history."""

from __future__ import annotations

import csv
import math
import os
import time

import keras
import numpy as np

from keras_transfer import internals, rundir
from keras_transfer.errors import ConfigError
from keras_transfer.io import load_model, read_json, read_model_extra, save_model


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
    state, the epoch it ends (`RESUME_STATE`), the random-generator states (`SeedState`) and the state of each
    callback in ``resumable`` (`ResumablePlateau`, `ResumableEarlyStopping`: each runs before this callback and
    takes its state up again with `taken_up`). A process killed
    at any instant leaves a ``last.keras`` whose parts agree; the history rows after it are cut on resume
    (`resume_state`). ``best.keras`` is written first, so it never misses an epoch ``last.keras`` has.
    """

    def __init__(self, directory, monitor="val_accuracy", best=-math.inf, resumable=()):
        super().__init__()
        self.directory, self.monitor, self.resumable = directory, monitor, tuple(resumable)
        self.best = best  # a resumed stage's best so far, so best.keras is not replaced by a worse epoch

    def on_epoch_end(self, epoch, logs=None):
        import io
        import json

        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = value
            save_model(self.model, os.path.join(self.directory, rundir.BEST))
        state = {"epoch": int(epoch), **{c.STATE_KEY: c.state() for c in self.resumable}}
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


def taken_up(stage_dir, epoch, key):
    """The state ``key`` that the stage's ``last.keras`` holds when that checkpoint ends ``epoch``, else None."""
    saved = checkpoint_state(stage_dir)
    return saved.get(key) if saved is not None and saved.get("epoch") == epoch else None


class ResumablePlateau(keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` whose state (the best value so far, the epochs waited, the cooldown)
    is saved in each ``last.keras`` (`AtomicCheckpoint`, which runs after it, so the checkpoint holds the rate of
    the next epoch) and read back when a stage resumes, so a resumed stage cuts its learning rate at the epoch an
    uninterrupted one does (Keras' callback starts afresh in every ``fit``).

    ``stage_dir``: the stage whose checkpoint holds the state; ``restore``: take it up at the beginning (a stage
    resumed, not a gradual phase begun); ``epoch``: the epoch the checkpoint must end for its state to be taken.
    """

    STATE_KEY = "plateau"

    def __init__(self, stage_dir, restore=False, epoch=-1, **kwargs):
        super().__init__(**kwargs)
        self.stage_dir, self.restore_on_begin, self.resume_epoch = stage_dir, restore, epoch

    def state(self):
        return {"best": float(self.best), "wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter)}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.restore_on_begin:
            return
        state = taken_up(self.stage_dir, self.resume_epoch, self.STATE_KEY)
        if state is None:  # a checkpoint of an earlier version: the side file, if it was written for the same epoch
            legacy = rundir.plateau_state_path(self.stage_dir)
            state = read_json(legacy) if os.path.exists(legacy) else {}
            if state.get("epoch") != self.resume_epoch:
                return
        self.best, self.wait, self.cooldown_counter = state["best"], state["wait"], state["cooldown_counter"]


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` on ``val_accuracy`` (restoring the best weights) whose state (the epochs
    waited, the best value and epoch) is saved in each ``last.keras`` (`AtomicCheckpoint`, which runs after it) and
    taken up when a stage resumes, the best weights read back from ``best.keras`` (the same epoch's: both keep the
    first epoch of the highest ``val_accuracy``), so a resumed stage stops where an uninterrupted one does."""

    STATE_KEY = "early_stopping"

    def __init__(self, stage_dir, restore=False, epoch=-1, patience=1):
        super().__init__("val_accuracy", patience=patience, mode="max", restore_best_weights=True)
        self.stage_dir, self.restore_on_begin, self.resume_epoch = stage_dir, restore, epoch

    def state(self):
        return {"wait": int(self.wait), "best": None if self.best is None else float(self.best),
                "best_epoch": int(self.best_epoch)}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state = taken_up(self.stage_dir, self.resume_epoch, self.STATE_KEY) if self.restore_on_begin else None
        if state is None:
            return
        self.wait, self.best, self.best_epoch = (state[k] for k in ("wait", "best", "best_epoch"))
        best = rundir.checkpoint_path(self.stage_dir, "best")
        if self.best is not None and os.path.exists(best):
            self.best_weights = load_model(best).get_weights()


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
        for layer in internals.flatten_layers(model):
            for sg in internals.seed_generators(layer):
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
