"""A pretrained model given to fine-tuning (``--pretrained RUN|MODEL.keras``): the file it names, the model,
what the run that wrote it says about it (provenance), and the configuration that fine-tunes from it."""

from __future__ import annotations

import os

from keras_transfer import rundir
from keras_transfer.errors import ConfigError, DataError
from keras_transfer.io import load_model, read_json


def _pretrained_file(path):
    """The ``.keras`` file ``path`` names: itself, or ``model.keras`` in a run directory (or its ``pretrain/``)."""
    import zipfile

    for c in (path, rundir.model_path(path), rundir.model_path(rundir.pretrain_dir(path))):
        if os.path.isfile(c):
            if not zipfile.is_zipfile(c):  # Keras' own error says "File not found" for a truncated file
                raise DataError(f"Could not load {c}: expected a complete Keras .keras (zip) file. Received: "
                                f"{os.path.getsize(c):,} bytes, not a zip archive (truncated?)")
            return c
    raise DataError(f"Expected a .keras file or a run directory with model.keras. Received: {path!r}")


def load_pretrained(path):
    """A pretrained classifier from ``MODEL.keras`` or a run directory holding ``model.keras``."""
    c = _pretrained_file(path)
    try:
        return load_model(c)
    except Exception as e:
        raise DataError(f"Could not load {c}: expected a Keras .keras model. Received: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def pretrained_provenance(path):
    """What the run that wrote the model at ``path`` says about it, read from beside the file.

    Returns:
        dict with ``file`` (the ``.keras`` file), ``metrics`` (its ``metrics.json``, with ``dataset``
        and ``accuracy``) and ``config`` (the pretrain run's resolved
        `RunConfig`); either is None when absent or unreadable (a model file on its own).
    """
    from keras_transfer import config as config_lib
    from keras_transfer.errors import KTransferError

    file = os.path.abspath(_pretrained_file(path))
    meta = os.path.dirname(file)
    metrics = run_cfg = None
    try:
        metrics = read_json(rundir.metrics_path(meta))
    except (OSError, ValueError):
        pass
    # A pretrain run keeps config.yaml beside model.keras; a finetune run one level above pretrain/.
    for d in (meta, os.path.dirname(meta) if os.path.basename(meta) == rundir.PRETRAIN else None):
        if d and os.path.isfile(rundir.config_path(d)):
            try:
                run_cfg = config_lib.load(rundir.config_path(d))
            except KTransferError:
                pass
            break
    if not (isinstance(metrics, dict) and {"dataset", "accuracy"} <= set(metrics)):
        metrics = None
    return {"file": file, "metrics": metrics, "config": run_cfg}


def with_pretrained(cfg, path, source=None, model=None):
    """``cfg`` fine-tuning from the model at ``path``: ``transfer.pretrained`` set, and ``data.source``
    and the ``model`` section (all but the new head's ``head_hidden`` / ``head_dropout``) taken from
    the run that wrote it, so the resolved config and the report say what the backbone is.

    ``source`` / ``model``: names given on the command line, refused when the pretrained run says otherwise.
    """
    import dataclasses

    prov = pretrained_provenance(path)
    run_cfg = prov["config"]
    cfg = dataclasses.replace(cfg, transfer=dataclasses.replace(cfg.transfer, pretrained=prov["file"]))
    if run_cfg is None:
        return cfg
    for flag, given, recorded in (("--source", source, run_cfg.data.source), ("--model", model, run_cfg.model.name)):
        if given is not None and given != recorded:
            raise ConfigError(f"{flag}: expected {recorded!r}, what the pretrained model {prov['file']} was "
                              f"trained with (or leave it out). Received: {given!r}")
    m = dataclasses.replace(run_cfg.model, head_hidden=cfg.model.head_hidden, head_dropout=cfg.model.head_dropout)
    # No pretraining runs here: a recipe's airbench-only pretraining key does not apply to another backbone.
    pre = cfg.pretrain if m.name == "airbench" else dataclasses.replace(cfg.pretrain, whiten_bias_epochs=None)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=run_cfg.data.source), model=m,
                               pretrain=pre)
