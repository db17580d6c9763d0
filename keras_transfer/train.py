"""Compile, fit and resume: the recipe's optimizer and loss (`keras_transfer.optim`), the callbacks
(`keras_transfer.callbacks`), checkpoints and resume."""

from __future__ import annotations

import math
import os

import keras

from keras_transfer import accel, rundir
from keras_transfer.callbacks import (
    AtomicCheckpoint,
    EpochTimer,
    FreezeBias,
    HistoryLogger,
    LearningRateLog,
    ResumableEarlyStopping,
    ResumablePlateau,
    SeedState,
    checkpoint_state,
    read_history,
)
from keras_transfer.data.pipeline import fit_input
from keras_transfer.errors import ConfigError
from keras_transfer.io import atomic_write_text, load_model
from keras_transfer.optim import (
    SparseSmoothedCrossentropy,
    make_optimizer,
)


def compile_model(model, cfg, steps_per_epoch, lr_multipliers=None):
    """Compile (or recompile, after a change of ``trainable``) with the recipe ``cfg``; ``lr_multipliers``:
    ``{variable path: factor}`` for weights that train at another rate (`LRMultipliers`)."""
    # "auto" is Keras' own rule: XLA on JAX, on TensorFlow only with an accelerator (on a CPU, XLA ran
    # EfficientNetB0 7-10x and the residual CNN 1.1-1.5x slower than TF's own kernels;
    # benchmarks/results/cpu2-efficientnet_b0-224-b16.md), never torch.compile on torch (minutes per
    # model; slower than eager on a GPU).
    jit = cfg.jit_compile if cfg.jit_compile == "auto" else bool(cfg.jit_compile)
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch, lr_multipliers),
        loss=SparseSmoothedCrossentropy(cfg.label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit,
        steps_per_execution=cfg.steps_per_execution,
    )
    return accel.apply(model)  # the torch fast path, where it is on (keras_transfer.accel)


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
    stopping = [ResumableEarlyStopping(stage_dir, restore, initial_epoch - 1, patience=cfg.early_stopping)
                ] if cfg.early_stopping else []
    # The history row is written before the checkpoint, so a kill between the two leaves a row too many, which
    # `resume_state` cuts, never a row missing. The schedule's and early stopping's states go into the checkpoint.
    callbacks = [EpochTimer(), LearningRateLog(), *plateau, *stopping,
                 SeedState(stage_dir, resumed),
                 HistoryLogger(rundir.history_path(stage_dir), append=resumed),
                 AtomicCheckpoint(ckpt, best=max((v for v in earlier if v == v), default=-math.inf),
                                  resumable=plateau + stopping),
                 *extra_callbacks]
    if cfg.whiten_bias_epochs is not None:
        callbacks.append(FreezeBias.for_model(model, cfg.whiten_bias_epochs))
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
    accel.install()
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
    accel.apply(model)  # as compile_model does (optimizer slots re-laid too); fit() restores the RNG states
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
