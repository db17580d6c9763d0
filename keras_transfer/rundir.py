"""The run directory's layout, in one place: no other module spells these file names.

A run (``ktransfer pretrain`` / ``finetune``)::

    RUN/
      config.yaml              the resolved configuration
      backbone.weights.h5      the weights a run started from (`keras_transfer.api.finetune` of a model
                               registered from Python)
      target.npz               the target images and labels given as arrays (`keras_transfer.api.finetune`)
      summary.json             a finished fine-tuning run's results (its presence: the run finished)
      report.md, report.html   the report
      comparison.png, curves.png, augmentation.png
      pretrain/                a stage: pretraining (a pretrain run is itself one stage)
      strategies/<name>/       a stage per strategy

A stage::

    STAGE/
      model.keras, metrics.json, history.csv, *.png
      checkpoints/{last,best}.keras   (last.keras also holds the epoch it ends and the random-generator and
                                       schedule states a resume takes up: `keras_transfer.callbacks.AtomicCheckpoint`)

A study (``ktransfer study``)::

    STUDY/
      study.yaml               the study file as it was resolved (its grid, seeds, base configuration)
      study.json, study.md, study.html, *.png
      runs/<condition>_seed-<s>/     an ordinary fine-tuning run per condition and seed
      pretrain/<key>_seed-<s>/       a pretrain run shared by the conditions that pretrain alike
"""

from __future__ import annotations

import os

CONFIG = "config.yaml"
SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
AUGMENTATION = "augmentation.png"
PRETRAIN = "pretrain"
STRATEGIES = "strategies"
PROBE = "probe"
MODEL = "model.keras"
METRICS = "metrics.json"
HISTORY = "history.csv"
CHECKPOINTS = "checkpoints"
LAST = "last.keras"
BEST = "best.keras"
STUDY_FILE = "study.yaml"
STUDY_JSON = "study.json"
STUDY_RUNS = "runs"
STUDY_PRETRAIN = "pretrain"
ERROR = "error.txt"
RNG_STATE = "rng.npz"
PLATEAU_STATE = "plateau.json"
BACKBONE_WEIGHTS = "backbone.weights.h5"
TARGET = "target.npz"


def config_path(run_dir):
    return os.path.join(run_dir, CONFIG)


def rng_state_path(stage_dir):
    """The random-generator states of the stage's last checkpoint as checkpoints of versions before 2026-12-07
    (second half) kept them, read when such a stage resumes (`keras_transfer.callbacks.SeedState`)."""
    return os.path.join(stage_dir, CHECKPOINTS, RNG_STATE)


def plateau_state_path(stage_dir):
    """The plateau schedule's state at the last checkpoint as earlier versions kept it, read when such a stage
    resumes (`keras_transfer.callbacks.ResumablePlateau`)."""
    return os.path.join(stage_dir, CHECKPOINTS, PLATEAU_STATE)


def backbone_weights_path(run_dir):
    return os.path.join(run_dir, BACKBONE_WEIGHTS)


def target_path(run_dir):
    return os.path.join(run_dir, TARGET)


def summary_path(run_dir):
    return os.path.join(run_dir, SUMMARY)


def error_path(run_dir):
    """Where a study records the one-line error of a run that failed."""
    return os.path.join(run_dir, ERROR)


def augmentation_path(run_dir):
    return os.path.join(run_dir, AUGMENTATION)


def pretrain_dir(run_dir):
    return os.path.join(run_dir, PRETRAIN)


def strategy_dir(run_dir, strategy):
    return os.path.join(run_dir, STRATEGIES, strategy)


def probe_dir(stage_dir):
    """Where ``lp-ft``'s linear probe (its first phase) keeps its history and checkpoints."""
    return os.path.join(stage_dir, PROBE)


def strategy_names(run_dir):
    """The strategies with a stage directory in ``run_dir``, sorted."""
    root = os.path.join(run_dir, STRATEGIES)
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def model_path(stage_dir):
    return os.path.join(stage_dir, MODEL)


def metrics_path(stage_dir):
    return os.path.join(stage_dir, METRICS)


def history_path(stage_dir):
    return os.path.join(stage_dir, HISTORY)


def checkpoint_path(stage_dir, which="last"):
    """``checkpoints/last.keras`` (the latest epoch) or ``checkpoints/best.keras``."""
    return os.path.join(stage_dir, CHECKPOINTS, LAST if which == "last" else BEST)


def is_finished(run_dir):
    """A fine-tuning run has finished once its summary is written (the last thing it writes); a pretrain
    run once its model is."""
    return os.path.isfile(summary_path(run_dir)) or (
        not os.path.isdir(os.path.join(run_dir, STRATEGIES)) and os.path.isfile(model_path(run_dir))
        and os.path.isfile(metrics_path(run_dir)))
