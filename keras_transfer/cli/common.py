"""The ``ktransfer`` group and what its commands share: one-line errors, run options, configuration from flags,
run directories."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import click

from keras_transfer import accel, rundir
from keras_transfer import config as config_lib
from keras_transfer.backend import quiet_tensorflow_retracing
from keras_transfer.data.augment import PRESETS
from keras_transfer.errors import KTransferError


def fail_cleanly(fn):
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
    ``git show 9246364:benchmarks/README.md``, "Host memory reuse"). The price: the process keeps its peak heap until it
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
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's own C++ log lines (hidden by default; also KTRANSFER_VERBOSE=1). "
                   "Give it first: ktransfer --verbose COMMAND.")
@fail_cleanly
def main(verbose):
    """Transfer learning for image classification on Keras 3 (TensorFlow, JAX or PyTorch).

    The backend is chosen by KERAS_BACKEND, e.g. `KERAS_BACKEND=jax ktransfer finetune`.
    """
    keep_freed_host_memory()  # KTRANSFER_MALLOC_TUNING=off keeps glibc's defaults
    # the torch fast path (keras_transfer.accel): on with a tested Keras, KTRANSFER_ACCEL=off turns it off
    accel.configure(accel.mode_from_environment())
    quiet_tensorflow_retracing()  # a new model per strategy is traced once: not TensorFlow's misuse case


def run_options(fn):
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


devices_option = click.option(
    "--devices", default="1", show_default=True,
    help="Train data-parallel on N local devices (or 'all') through keras.distribution.DataParallel (JAX); "
         "each batch is split across them.")


def check_devices(value, *batch_sizes):
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


def resolve_config(config_path, o, stage="finetune", **transfer):
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


def prepare_run(kind, o):
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
def started_run(run_dir, resume, existed):
    """Inside, a `KTransferError` (a corrupted image, a class-count mismatch, a target that cannot be read) that
    stops a new run before it wrote any result removes what it wrote, and the run directory unless it ``existed``
    (empty), so the same command runs once the input is fixed; an earlier result that ``--overwrite`` moved aside
    is put back. Resumed runs, and runs with results, are left as they are."""
    try:
        yield
    except KTransferError:
        if not resume and os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= _START_FILES:
            from keras_transfer.io import restore_moved

            for name in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name))
            if not restore_moved(run_dir) and not existed:
                from keras_transfer.io import remove_created

                os.rmdir(run_dir)
                remove_created(run_dir)  # and the parents made for it (runs/)
        raise


def empty_dir_given(o):
    return bool(o.get("out")) and os.path.isdir(o["out"]) and not os.listdir(o["out"])


def load_resume_config(run_dir, cfg):
    path = rundir.config_path(run_dir)
    return config_lib.load(path) if os.path.exists(path) else cfg
