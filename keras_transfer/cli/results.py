"""``ktransfer evaluate``, ``gradcam``, ``predict``, ``export`` and ``compare``: the commands that read runs."""

from __future__ import annotations

import os

import click

from keras_transfer import config as config_lib
from keras_transfer import rundir
from keras_transfer.cli.common import (
    fail_cleanly,
    main,
)
from keras_transfer.errors import KTransferError


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
@fail_cleanly
def evaluate(target, dataset, data_dir, split, tta, out, overwrite):
    """Evaluate RUN_DIR or MODEL.keras: accuracy, top-k, per-class P/R/F1, confusion matrix."""
    from keras_transfer import plots
    from keras_transfer.evaluate import evaluate_model, format_table
    from keras_transfer.io import check_output, new_run_dir, write_json
    from keras_transfer.pretrained import load_pretrained

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
        model_path, (run_dir, key) = target, _run_of_model_file(target)
        run_data = _run_data_config(run_dir) if run_dir else {}
        missing = f"A .keras file outside a run directory needs --dataset. Received: {target} alone"
    else:
        model_path, key = _run_model(target)
        run_data = _run_data_config(target)
        missing = (f"Expected a run directory with config.yaml (or --dataset). Received: {target} without "
                   f"data.{key} in config.yaml")
    if dataset is None:
        if not run_data.get(key):
            raise KTransferError(missing)
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
@fail_cleanly
def gradcam(target, dataset, data_dir, layer, num_images, out, strategies, overwrite):
    """Grad-CAM heatmaps over test images for RUN_DIR or MODEL.keras."""
    import numpy as np

    from keras_transfer import plots
    from keras_transfer.evaluate import predict_logits, softmax
    from keras_transfer.gradcam import grad_cam
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.pretrained import load_pretrained

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
    from keras_transfer.pretrained import load_pretrained

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
@fail_cleanly
def predict(target, images, top_k, tta, out, overwrite):
    """Classify image files (or folders of them, searched recursively) with RUN_DIR or MODEL.keras.

    Each image is converted to the model's channels, centre-cropped to its aspect ratio and resized to its
    input size, as image folders are when a run reads them. Class names come from the run's metrics.json.
    """
    import numpy as np

    from keras_transfer.data.formats import decode_image, image_files
    from keras_transfer.evaluate import softmax, tta_logits
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.pretrained import load_pretrained

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
@fail_cleanly
def export(target, fmt, strategy, out, overwrite):
    """Export RUN_DIR's model (or MODEL.keras) to load and predict without keras-transfer installed.

    Raw uint8 images in (the model's input size and channels), class probabilities out; this package's
    layers are replaced by Keras layers that compute the same at inference.
    """
    import numpy as np

    from keras_transfer.export import SUFFIX
    from keras_transfer.export import export as export_model
    from keras_transfer.io import check_output, move_aside
    from keras_transfer.pretrained import load_pretrained

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
@fail_cleanly
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
