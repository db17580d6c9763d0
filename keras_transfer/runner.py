"""The flow: config -> data + model -> transfer strategy -> train -> evaluate -> report."""

from __future__ import annotations

import os
import time

import keras
import numpy as np

from keras_transfer import accel, distribute, plots, rundir
from keras_transfer.backend import enable_compilation_cache
from keras_transfer.baselines import run_baselines
from keras_transfer.callbacks import EpochProgress, read_history
from keras_transfer.config import needs_pretraining, weights_label, weights_source
from keras_transfer.data import load_dataset, train_val_test
from keras_transfer.data.augment import augmentation_layers
from keras_transfer.data.pipeline import make_input, steps_per_epoch
from keras_transfer.data.registry import check_every_class
from keras_transfer.errors import ConfigError
from keras_transfer.evaluate import evaluate_model
from keras_transfer.io import read_json, save_model, write_json
from keras_transfer.memory import PeakMemory
from keras_transfer.methods import VARIABLE_LEVEL, BatchSpectralShrinkage, attach_l2sp, pretrained_values
from keras_transfer.models import (
    build_classifier,
    channel_stats,
    copy_backbone,
    create_backbone,
    get_spec,
    initialise_from_data,
)
from keras_transfer.optim import set_precision
from keras_transfer.pretrained import load_pretrained
from keras_transfer.train import compile_model, fit, resume_state
from keras_transfer.transfer import (
    apply_strategy,
    feature_extractor,
    feature_statistics,
    gradual_schedule,
    head_model,
    learning_rate_multipliers,
    parameter_counts,
    set_trainable_blocks,
)

NO_FLIP = {"mnist", "mnist_5k", "digits", "digits28", "emnist_letters"}


def _log(msg, echo):
    if echo:
        echo(msg)


def _splits(name, dcfg, seed, low_data):
    ds = load_dataset(name, dcfg.data_dir, image_size=dcfg.image_size)
    splits = train_val_test(ds, dcfg.val, dcfg.per_class if low_data else None,
                            dcfg.fraction if low_data else None, seed)
    check_every_class(ds.name, splits["train"][1], ds.class_names)
    return ds, splits


def _augment(dcfg, ds, seed):
    flips = dcfg.flips if dcfg.flips is not None else ds.name not in NO_FLIP
    # flips: alternate flips in the training input (ArrayBatches), not in the model.
    return augmentation_layers(dcfg.augment, ds.image_shape[-1], flips=bool(flips) and flips != "alternate",
                              seed=seed)


def _classifier(backbone, spec_name, mcfg, ds, x_train, dcfg, seed, feature_stats=None, feature_penalty=None):
    """The classifier around ``backbone`` (registered as ``spec_name``, whose input contract it gets);
    ``feature_stats`` / ``feature_penalty``: see `build_classifier` (the linear probe's; ``bss``'s)."""
    channels = backbone.input.shape[-1]
    mean, std = channel_stats(x_train, channels)
    return build_classifier(backbone, spec_name, ds.image_shape, ds.num_classes, mean=mean, std=std,
                            augment=_augment(dcfg, ds, seed), head_hidden=mcfg.head_hidden,
                            head_dropout=mcfg.head_dropout, seed=seed, feature_stats=feature_stats,
                            feature_penalty=feature_penalty)


def _evaluate_and_plot(model, ds, splits, stage_dir, label, history, tta="none"):
    x_te, y_te = splits["test"]
    metrics, probs = evaluate_model(model, x_te, y_te, ds.class_names, tta=tta)
    plots.confusion_matrix_figure(metrics["confusion_matrix"], ds.class_names,
                                  os.path.join(stage_dir, "confusion_matrix.png"),
                                  title=f"{label}: confusion matrix on {ds.name} test (row-normalised)")
    plots.curves_figure({label: history}, os.path.join(stage_dir, "curves.png"), title=f"{label}: training curves")
    plots.misclassified_figure(x_te, y_te, probs, ds.class_names, os.path.join(stage_dir, "misclassified.png"),
                               title=f"{label}: misclassified {ds.name} test images, most confident first")
    return metrics


def _train_input(splits, dcfg, seed, initial_epoch):
    """The training input: shuffled, seeded per epoch, flipped alternately and cut to full batches as
    ``dcfg`` says."""
    x_tr, y_tr = splits["train"]
    return make_input(x_tr, y_tr, dcfg.batch_size, True, seed, dcfg.input_path, initial_epoch,
                      alternate_flips=dcfg.flips == "alternate", drop_last=dcfg.drop_last,
                      multiple_of=distribute.device_count())


def _val_input(splits, batch_size, seed, input_path):
    """The validation input, or None with ``val: 0`` (train on the whole training split)."""
    x_val, y_val = splits["val"]
    n = distribute.device_count()  # with several devices, at most n - 1 images left out (`distribute`)
    return (make_input(x_val, y_val, batch_size, False, seed, input_path, multiple_of=n)
            if len(x_val) >= n else None)


def train_stage(model, spec_name, splits, tcfg, dcfg, stage_dir, seed, strategy="full", phases=None, resume=False,
                echo=None, lr_scales=None, prepare=None):
    """Train one stage (a strategy, or pretraining); gradual runs phases, recompiling each.

    ``strategy`` labels the progress lines (`EpochProgress`) echoed for slow epochs.

    ``tcfg``: the stage's `TrainConfig`; ``dcfg``: the `DataConfig` (batch size, input path, flips,
    full batches only). ``lr_scales``: ``(backbone_lr, layer_decay)`` for the backbone's learning-rate
    multipliers (`TransferConfig.lr_scales`), or None. ``prepare``: called with the model that trains
    (``model``, or the one resumed from the stage's checkpoint) before it is compiled or fitted, for what a saved
    model does not keep (L2-SP's regularizers).

    Returns:
        ``(model, wall_seconds)``: a resumed stage's include its epochs before the interruption.
    """
    steps = steps_per_epoch(len(splits["train"][0]), dcfg.batch_size, dcfg.drop_last, distribute.device_count())
    val = _val_input(splits, dcfg.batch_size, seed, dcfg.input_path)
    start, earlier = 0, 0.0
    if resume and os.path.exists(rundir.checkpoint_path(stage_dir)):
        model, start = resume_state(stage_dir)
        # The epochs trained before the interruption count in the stage's wall time.
        earlier = float(sum(read_history(rundir.history_path(stage_dir)).get("epoch_time", [])[:start]))
        _log(f"  resuming {stage_dir} at epoch {start}", echo)
    if prepare is not None:
        prepare(model)
    progress = [EpochProgress(echo, f"{strategy:8s} ")] if echo else []

    def multipliers():  # of the weights trainable now
        return learning_rate_multipliers(model, spec_name, *lr_scales) if lr_scales else None

    t0 = time.perf_counter()
    if phases:
        per_phase = max(1, tcfg.epochs // len(phases))
        epoch = 0
        for i, blocks in enumerate(phases):
            end = tcfg.epochs if i == len(phases) - 1 else epoch + per_phase
            if end > start:
                set_trainable_blocks(model, spec_name, blocks)
                compile_model(model, tcfg, steps, multipliers())  # recompile after every change of trainable
                fit(model, _train_input(splits, dcfg, seed, max(start, epoch)), val, tcfg, stage_dir,
                    initial_epoch=max(start, epoch), epochs=end, extra_callbacks=progress,
                    resume_schedule=start > epoch)  # resumed inside this phase, not begun
            epoch = end
    elif start < tcfg.epochs:
        if not resume or start == 0:
            compile_model(model, tcfg, steps, multipliers())
        fit(model, _train_input(splits, dcfg, seed, start), val, tcfg, stage_dir, initial_epoch=start,
            extra_callbacks=progress)
    return model, time.perf_counter() - t0 + earlier


def train_cached_linear(model, splits, tcfg, stage_dir, seed, batch_size, train_features=None):
    """Linear probe on cached features: the frozen backbone runs once, the head trains on its output.

    The head layers are shared with ``model``, so ``model`` holds the trained head afterwards.
    Augmentation does not apply (features are computed once, in inference mode).
    ``train_features``: the backbone's output on ``splits["train"]`` when already computed.

    Returns:
        ``(model, wall_seconds)``.
    """
    t0 = time.perf_counter()
    extractor = feature_extractor(model)
    if train_features is None:
        train_features = distribute.predict(extractor, splits["train"][0])
    feats = {"train": train_features, "val": distribute.predict(extractor, splits["val"][0])}
    head = head_model(model)
    n = distribute.device_count()
    compile_model(head, tcfg, steps_per_epoch(len(feats["train"]), batch_size, multiple_of=n))
    fit(head, make_input(feats["train"], splits["train"][1], batch_size, True, seed, "memory", multiple_of=n),
        _val_input({"val": (feats["val"], splits["val"][1])}, batch_size, seed, "memory"), tcfg, stage_dir)
    return model, time.perf_counter() - t0


def pretrain(cfg, run_dir, echo=None, resume=False, devices=1):
    """Pretrain the backbone on ``cfg.data.source``; writes ``run_dir/model.keras``. ``devices``: train
    data-parallel on that many local devices (`keras_transfer.distribute`)."""
    distribute.check_batch_size(cfg.data.batch_size, devices)
    with distribute.data_parallel(devices):
        return _pretrain(cfg, run_dir, echo, resume)


def _pretrain(cfg, run_dir, echo, resume):
    enable_compilation_cache()
    accel.install()  # where it is on: TensorFlow imported only when tf.data needs it
    set_precision(cfg.pretrain.precision)
    keras.utils.set_random_seed(cfg.seed)
    ds, splits = _splits(cfg.data.source, cfg.data, cfg.seed, low_data=False)
    m = cfg.model
    backbone = create_backbone(m.name, m.input_size, m.channels or ds.image_shape[-1], m.weights,
                               **m.backbone_options())
    model = _classifier(backbone, m.name, m, ds, splits["train"][0], cfg.data, cfg.seed)
    initialise_from_data(model, m.name, splits["train"][0])
    _log(f"pretrain {m.name} on {ds.name}: {len(splits['train'][0])} train / {len(splits['val'][0])} val / "
         f"{len(splits['test'][0])} test, {cfg.pretrain.epochs} epochs", echo)
    with PeakMemory() as peak:
        model, wall = train_stage(model, m.name, splits, cfg.pretrain, cfg.data, run_dir, cfg.seed, "pretrain",
                                  resume=resume, echo=echo)
    history = read_history(rundir.history_path(run_dir))
    metrics = _evaluate_and_plot(model, ds, splits, run_dir, f"pretrain {ds.name}", history, cfg.data.tta)
    trainable, frozen = parameter_counts(model)
    metrics.update(dataset=ds.name, model=m.name, wall_time=wall, trainable_params=trainable,
                   non_trainable_params=frozen, backend=keras.config.backend(), devices=distribute.device_count(),
                   **epoch_timing(history.get("epoch_time", [])), **peak.as_dict())
    save_model(model, rundir.model_path(run_dir))
    write_json(rundir.metrics_path(run_dir), metrics)  # last: with model.keras, the pretraining finished
    timing = (f"; first epoch {metrics['first_epoch_s']:.1f} s, training without compilation "
              f"{metrics['train_s_without_compile']:.1f} s" if "first_epoch_s" in metrics else "")
    _log(f"  pretrain test accuracy {metrics['accuracy']:.4f} ({wall:.1f} s{timing})", echo)
    return model, metrics


def epoch_timing(epoch_times):
    """Split training time into compilation and training, from per-epoch times (seconds).

    The first epoch holds the compilation; its training share is taken to be the median of the
    later epochs. Returns ``{}`` with fewer than 2 epochs.
    """
    if len(epoch_times) < 2:
        return {}
    steady = float(np.median(epoch_times[1:]))
    return {"first_epoch_s": float(epoch_times[0]), "epoch_s_median": steady,
            "compile_s_estimate": max(0.0, float(epoch_times[0]) - steady),
            "train_s_without_compile": float(np.sum(epoch_times[1:])) + steady}


def finetune(cfg, run_dir, echo=None, resume=False, preview=True, devices=1):
    """Pretrain (unless ``cfg.transfer.pretrained`` is set, see `with_pretrained`, or ``model.weights`` names
    weights to start from, see `weights_source`), then fine-tune every strategy and report.

    The pretrained model (if given) and then the target are loaded first, once: a bad pretrained
    file or a target that cannot be read stops the run before any pretraining, and the augmentation
    preview (``preview``, written unless the preset is ``none``) comes from the same arrays. ``devices``: train
    data-parallel on that many local devices (`keras_transfer.distribute`).
    """
    distribute.check_batch_size(cfg.data.batch_size, devices)
    with distribute.data_parallel(devices):
        return _finetune(cfg, run_dir, echo, resume, preview)


def _finetune(cfg, run_dir, echo, resume, preview):
    enable_compilation_cache()
    accel.install()  # where it is on: TensorFlow imported only when tf.data needs it
    pretrained = cfg.transfer.pretrained
    source_model = load_pretrained(pretrained) if pretrained is not None else None
    ds, splits = _splits(cfg.data.target, cfg.data, cfg.seed, low_data=True)
    m = cfg.model
    weights = weights_source(cfg)
    source_backbone = None
    if weights:  # the backbone starts from these weights: no pretraining stage
        source_backbone = create_backbone(m.name, m.input_size, m.channels or ds.image_shape[-1], weights,
                                          **m.backbone_options())
        _log(f"backbone {m.name} from {weights_label(weights)} weights; no pretraining stage", echo)
    elif source_model is None and not needs_pretraining(cfg):  # scratch only: nothing to transfer
        source_backbone = create_backbone(m.name, m.input_size, m.channels or ds.image_shape[-1], None,
                                          **m.backbone_options())
        _log(f"scratch only: {m.name} built fresh for {ds.name}; no pretraining stage", echo)
    if preview and cfg.data.augment != "none":
        augmentation_preview(cfg, ds, rundir.augmentation_path(run_dir))
    if source_backbone is None:
        if source_model is None:
            pre_dir = rundir.pretrain_dir(run_dir)
            if resume and os.path.exists(rundir.model_path(pre_dir)):
                source_model = load_pretrained(pre_dir)
            else:
                source_model, _ = _pretrain(cfg, pre_dir, echo, resume)
        source_backbone = source_model.get_layer("backbone")
    spec_name = _spec_name_of(source_backbone, m.name)
    set_precision(cfg.finetune.precision)
    _log(f"fine-tune on {ds.name}: {len(splits['train'][0])} train / {len(splits['val'][0])} val / "
         f"{len(splits['test'][0])} test", echo)
    results = {}
    for strategy in cfg.transfer.strategies:
        stage_dir = rundir.strategy_dir(run_dir, strategy)
        if resume and os.path.exists(rundir.metrics_path(stage_dir)):
            results[strategy] = read_json(rundir.metrics_path(stage_dir))
            continue
        with PeakMemory() as peak:
            results[strategy] = _finetune_strategy(cfg, strategy, source_backbone, spec_name, ds, splits,
                                                   stage_dir, resume, echo)
        results[strategy].update(peak.as_dict())
        write_json(rundir.metrics_path(stage_dir), results[strategy])
        r = results[strategy]
        _log(f"  {strategy:8s} test accuracy {r['accuracy']:.4f}  macro-F1 {r['macro']['f1']:.4f}  "
             f"({r['wall_time']:.1f} s, peak host memory {r['peak_host_mb'] or float('nan'):,.0f} MB)", echo)
    baselines = run_baselines(splits, ds.class_names, cfg.transfer.baselines, cfg.seed)
    for name, b in baselines.items():
        _log(f"  {name:8s} test accuracy {b['accuracy']:.4f}  macro-F1 {b['macro']['f1']:.4f}  "
             f"({b['wall_time']:.1f} s; {b['method']})", echo)
    from keras_transfer.report import write_finetune_report

    write_finetune_report(cfg, run_dir, ds, splits, results, model_name=spec_name, baselines=baselines)
    return results


def _finetune_strategy(cfg, strategy, source_backbone, spec_name, ds, splits, stage_dir, resume, echo):
    """Fine-tune one strategy from ``source_backbone``; writes the stage's model and figures and returns its
    metrics (written to ``metrics.json`` by the caller)."""
    m, t = cfg.model, cfg.transfer
    keras.utils.set_random_seed(cfg.seed)
    channels = source_backbone.input.shape[-1]
    if t.channel_mode == "conv" and ds.image_shape[-1] == 1 and channels == 3:
        channels = 1
    # scratch: the same architecture with a fresh initialisation.
    backbone = copy_backbone(source_backbone, channels, fresh=strategy == "scratch")
    penalty = BatchSpectralShrinkage(t.bss_eta, t.bss_k, name="head_bss") if strategy == "bss" else None
    model = _classifier(backbone, spec_name, m, ds, splits["train"][0], cfg.data, cfg.seed, feature_penalty=penalty)
    train_features, feature_pass = None, 0.0
    if strategy in ("linear", "lp-ft"):  # the head trains on the frozen features standardised (feature_statistics)
        t0 = time.perf_counter()
        train_features = distribute.predict(feature_extractor(model), splits["train"][0])
        model = _classifier(backbone, spec_name, m, ds, splits["train"][0], cfg.data, cfg.seed,
                            feature_stats=feature_statistics(train_features))
        feature_pass = time.perf_counter() - t0  # counted in the strategy's wall time
    if strategy == "scratch":
        initialise_from_data(model, spec_name, splits["train"][0])
    if strategy in VARIABLE_LEVEL and resume and os.path.exists(rundir.checkpoint_path(stage_dir)):
        # A saved model keeps its layers' trainable flags, not its variables': the optimizer state in the
        # checkpoint belongs to the frozen-variable model, so the interrupted stage starts again (same seed).
        _log(f"  {strategy:8s} restarts from its first epoch (its frozen variables are not in the checkpoint)", echo)
        resume = False
    w0 = pretrained_values(backbone) if strategy == "l2sp" else None
    apply_strategy(model, spec_name, strategy, t.freeze_until, t.train_last_k, t.surgical_block)
    phases = gradual_schedule(spec_name, t.gradual_phases) if strategy == "gradual" else None
    extra = {}
    if phases:  # gradual: the parameters each phase trains; its own count is its last phase's
        counts = []
        for blocks in phases:
            set_trainable_blocks(model, spec_name, blocks)
            counts.append(parameter_counts(model))
        apply_strategy(model, spec_name, strategy)  # back to the head-only first phase
        (trainable, frozen), extra = counts[-1], {"trainable_params_by_phase": [t for t, _ in counts]}
        _log(f"  {strategy:8s} trainable {' -> '.join(f'{t:,}' for t, _ in counts)} parameters over "
             f"{len(phases)} phases", echo)
    else:
        trainable, frozen = parameter_counts(model)
        _log(f"  {strategy:8s} trainable {trainable:,} / frozen {frozen:,} parameters", echo)
    scales = t.lr_scales(strategy)  # (backbone_lr, layer_decay) or None
    if strategy == "lp-ft":
        probe_wall = _lp_ft_probe(model, spec_name, cfg, splits, stage_dir, train_features, resume, echo)
        extra["probe_wall_time"] = probe_wall
        feature_pass += probe_wall
        apply_strategy(model, spec_name, "full")
    prepare = (lambda mdl: attach_l2sp(mdl, w0, t.l2sp_alpha, t.l2sp_beta)) if strategy == "l2sp" else None
    if strategy == "linear" and t.cached_features:
        model, wall = train_cached_linear(model, splits, cfg.finetune, stage_dir, cfg.seed,
                                          cfg.data.batch_size, train_features)
    else:
        model, wall = train_stage(model, spec_name, splits, cfg.finetune, cfg.data, stage_dir, cfg.seed,
                                  strategy, phases, resume, echo, scales, prepare)
    history = read_history(rundir.history_path(stage_dir))
    metrics = _evaluate_and_plot(model, ds, splits, stage_dir, strategy, history, cfg.data.tta)
    if scales:
        extra["backbone_lr"], extra["layer_decay"] = scales
    metrics.update(strategy=strategy, dataset=ds.name, model=spec_name, wall_time=wall + feature_pass,
                   trainable_params=trainable, non_trainable_params=frozen,
                   backend=keras.config.backend(), devices=distribute.device_count(),
                   epochs=len(history.get("epoch", [])), **extra)
    save_model(model, rundir.model_path(stage_dir))
    return metrics


def _lp_ft_probe(model, spec_name, cfg, splits, stage_dir, train_features, resume, echo):
    """LP-FT's first phase: the linear probe on cached features, ``transfer.lp_epochs`` epochs of the ``finetune``
    recipe, in ``stage_dir/probe`` (its history and checkpoints); ``model``'s head holds the trained probe after.
    Skipped when the fine-tuning phase already has a checkpoint to resume from (which holds the head).

    Returns the probe's wall time in seconds (read from its history when skipped)."""
    import dataclasses

    probe_dir = rundir.probe_dir(stage_dir)
    if resume and os.path.exists(rundir.checkpoint_path(stage_dir)):
        return float(sum(read_history(rundir.history_path(probe_dir)).get("epoch_time", [])))
    apply_strategy(model, spec_name, "linear")
    probe_cfg = dataclasses.replace(cfg.finetune, epochs=cfg.transfer.lp_epochs, early_stopping=None)
    _, wall = train_cached_linear(model, splits, probe_cfg, probe_dir, cfg.seed, cfg.data.batch_size, train_features)
    h = read_history(rundir.history_path(probe_dir))
    if h.get("val_accuracy"):
        _log(f"  lp-ft    probe: {len(h['epoch'])} epochs, val accuracy {h['val_accuracy'][-1]:.4f} ({wall:.1f} s); "
             f"then every block trains", echo)
    return wall


def _spec_name_of(backbone, configured):
    """The registered name of a loaded backbone: the configured one when its blocks fit."""
    if get_spec(configured).matches(backbone):
        return configured
    from keras_transfer.models import list_models

    for name in list_models(builtin_only=True) + list_models():  # this package's own models first
        if get_spec(name).matches(backbone):
            return name
    raise ConfigError(f"Cannot tell which registered model the pretrained backbone is. Received "
                      f"layers: {sorted(layer.name for layer in backbone.layers)[:5]}...")


def augmentation_preview(cfg, ds, path, n_images=4, n_samples=6):
    """Save a grid of augmented samples of ``ds``'s training images (the model's own layers)."""
    layers = _augment(cfg.data, ds, cfg.seed)
    x = ds.x_train[:n_images]
    outs = []
    for _ in range(n_samples):
        y = keras.ops.convert_to_tensor(x.astype("float32"))
        for layer in layers:
            y = layer(y, training=True)
        outs.append(np.asarray(keras.ops.convert_to_numpy(y)))
    plots.augmentation_figure(x, np.stack(outs, 1), path,
                              title=f"Augmentation preview: preset '{cfg.data.augment}' on {ds.name}")
