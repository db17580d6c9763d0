"""``ktransfer datasets``, ``models`` and ``info``: what is here."""

from __future__ import annotations

import os

import click

from keras_transfer.cli.common import (
    fail_cleanly,
    main,
)


@main.command()
@click.option("--data-dir", type=click.Path(), help="Dataset cache root (env KTRANSFER_DATA_DIR).")
@fail_cleanly
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
@fail_cleanly
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
    from keras_transfer import accel

    click.echo(f"torch fast path: {accel.describe()}")


if __name__ == "__main__":
    main()
