"""``ktransfer bench`` and ``bench-probe``: throughput and the cached-feature probe."""

from __future__ import annotations

import os

import click

from keras_transfer import config as config_lib
from keras_transfer.cli.common import (
    check_devices,
    devices_option,
    fail_cleanly,
    main,
    resolve_config,
    run_options,
)
from keras_transfer.data.augment import PRESETS
from keras_transfer.errors import KTransferError


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
@click.option("--out", type=click.Path(), default=os.path.join("runs", "bench"), show_default=True)
@devices_option
@fail_cleanly
def bench(models_, size, strategies, batch_size, steps, precision, augment, jit, repeats, with_timm, compile_cache,
          probe_epochs, steps_per_execution, compile_first, out, devices):
    """Training throughput (img/s), step time, compile time, peak memory: ours vs plain Keras.

    Writes <out>/bench-<backend>-<time>.json and .md with hardware, versions and date (benchmarks/results/
    keeps one current table per configuration, with its command).
    """
    import time as _time

    from keras_transfer import bench as bench_lib
    from keras_transfer import distribute
    from keras_transfer.io import atomic_write_text, write_json
    from keras_transfer.models import get_spec

    devices = check_devices(devices, batch_size)
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
@run_options
@click.option("--pretrained", type=click.Path(), required=True, help="Pretrained MODEL.keras or pretrain run dir.")
@click.option("--seeds", default="0,1,2", show_default=True)
@fail_cleanly
def bench_probe(config_path, pretrained, seeds, **o):
    """Linear probe, ordinary vs cached features, on the same data and seeds: accuracy and wall time.

    Writes <out>/probe.json and probe.md (default out: runs/bench-probe-<time>).
    """
    from keras_transfer import bench as bench_lib
    from keras_transfer.io import atomic_write_text, new_run_dir, write_json

    cfg = bench_lib.probe_config(resolve_config(config_path, o))  # recorded as run
    o.pop("resume_dir", None)
    out = new_run_dir(o.get("out"), "bench-probe", o.get("overwrite"))
    seed_list = [int(s) for s in seeds.split(",")]
    rows = bench_lib.bench_cached_probe(cfg, pretrained, out, seed_list, echo=click.echo)
    env = bench_lib.environment()
    write_json(os.path.join(out, "probe.json"), {"environment": env, "config": config_lib.to_dict(cfg),
                                                 "pretrained": pretrained, "rows": rows})
    atomic_write_text(os.path.join(out, "probe.md"), bench_lib.probe_markdown(env, cfg, pretrained, rows))
    click.echo(f"wrote {out}/probe.md")
