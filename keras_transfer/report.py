"""Markdown and self-contained HTML reports, and comparisons across runs."""

from __future__ import annotations

import base64
import os
import re

import keras
import numpy as np

from keras_transfer import plots, rundir
from keras_transfer.config import needs_pretraining, to_dict, weights_label, weights_source
from keras_transfer.io import atomic_write_text, read_json, write_json


def markdown_to_html(md, base_dir, title):
    """Render Markdown to one HTML file with every local PNG embedded as base64."""
    import markdown

    body = markdown.markdown(md, extensions=["tables", "fenced_code"])

    def embed(m):
        src = m.group(1)
        p = os.path.join(base_dir, src)
        if os.path.exists(p) and src.endswith(".png"):
            with open(p, "rb") as f:
                return f'src="data:image/png;base64,{base64.b64encode(f.read()).decode()}"'
        return m.group(0)

    body = re.sub(r'src="([^"]+)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             "code,pre{background:#f6f6f6}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def write_report(run_dir, md, title):
    atomic_write_text(os.path.join(run_dir, rundir.REPORT_MD), md)
    atomic_write_text(os.path.join(run_dir, rundir.REPORT_HTML), markdown_to_html(md, run_dir, title))


def per_class_table(metrics):
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for r in metrics["per_class"]:
        lines.append(f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['support']} |")
    for avg in ("macro", "weighted"):
        a = metrics[avg]
        lines.append(f"| *{avg} avg* | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | "
                     f"{metrics['n']} |")
    return "\n".join(lines)


def _pretraining(cfg, run_dir):
    """``(source label, pretrain metrics or None)``: this run's pretraining, or the pretrained model's."""
    if weights_source(cfg):
        return weights_label(weights_source(cfg)), None
    if cfg.transfer.pretrained is None and not needs_pretraining(cfg):
        return "none (scratch only)", None
    if cfg.transfer.pretrained is None:
        pre = rundir.metrics_path(rundir.pretrain_dir(run_dir))
        return cfg.data.source, read_json(pre) if os.path.exists(pre) else None
    from keras_transfer.pretrained import pretrained_provenance

    prov = pretrained_provenance(cfg.transfer.pretrained)
    metrics = prov["metrics"]
    if prov["config"] is not None:
        return cfg.data.source, metrics
    return (metrics["dataset"] if metrics else os.path.basename(prov["file"])), metrics


def write_finetune_report(cfg, run_dir, ds, splits, results, model_name=None, baselines=None):
    """Comparison table, verdict on transfer vs scratch and vs the classical baselines, per-strategy figures;
    md + html + json.

    ``model_name``: the registered backbone fine-tuned (default ``cfg.model.name``). ``baselines``:
    `keras_transfer.baselines.run_baselines`'s results on the same split (reference rows).
    """
    model_name = model_name or cfg.model.name
    baselines = baselines or {}
    source, pre_metrics = _pretraining(cfg, run_dir)
    rows = [{"label": s, "accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"], "wall_time": r["wall_time"],
             "trainable_params": r["trainable_params"]} for s, r in results.items()]
    rows += [{"label": f"{b} (pixels)", "accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"],
              "wall_time": r["wall_time"], "trainable_params": r["trainable_params"], "reference": True}
             for b, r in baselines.items()]
    plots.comparison_figure(rows, os.path.join(run_dir, "comparison.png"),
                            title=f"{source} -> {ds.name}: strategies on the test split")
    histories = {s: _history(run_dir, s) for s in results}
    plots.curves_figure(histories, os.path.join(run_dir, "curves.png"), title="Fine-tuning curves, all strategies")
    summary = {"backend": keras.config.backend(), "keras": keras.__version__, "source": source,
               "pretrained": cfg.transfer.pretrained, "model": model_name,
               "target": ds.name, "target_train": int(len(splits["train"][0])),
               "target_test": int(len(splits["test"][0])),
               "pretrain_accuracy": pre_metrics["accuracy"] if pre_metrics else None,
               "strategies": {s: {k: r[k] for k in ("accuracy", "wall_time", "trainable_params",
                                                     "non_trainable_params", "epochs")}
                              | {"macro_f1": r["macro"]["f1"]}
                              | {k: r.get(k) for k in ("peak_host_mb", "peak_device_mb")}
                              for s, r in results.items()},
               "baselines": {b: {"accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"],
                                 "wall_time": r["wall_time"], "method": r["method"]} for b, r in baselines.items()}}
    verdict = transfer_verdict(results)
    if baselines:
        verdict += " " + baseline_verdict(results, baselines)
    summary["verdict"] = verdict

    lines = [f"# Transfer report: {source} → {ds.name}", "",
             f"Backend **{keras.config.backend()}** (Keras {keras.__version__}), model **{model_name}**, "
             f"seed {cfg.seed}. Target training set: **{len(splits['train'][0])} images** "
             f"({cfg.data.per_class or 'all'} per class), validation {len(splits['val'][0])}, "
             f"test {len(splits['test'][0])}.", ""]
    if cfg.transfer.pretrained:
        lines += [f"Pretrained model: `{cfg.transfer.pretrained}`" + (
            f", trained on {pre_metrics['dataset']} to test accuracy **{pre_metrics['accuracy']:.4f}**."
            if pre_metrics else " (no metrics.json beside it: where it was trained is not recorded)."), ""]
    elif weights_source(cfg):
        w = weights_source(cfg)
        lines += [f"Backbone weights: **{weights_label(w)}** (`model.weights: {w}`"
                  + (", keras.applications' own file" if w == "imagenet" else "") + "); no pretraining stage.", ""]
    elif pre_metrics:
        lines += [f"Pretraining on {pre_metrics['dataset']}: test accuracy **{pre_metrics['accuracy']:.4f}** "
                  f"in {pre_metrics['wall_time']:.1f} s.", ""]
    lines += ["## Verdict", "", verdict, "", "## Strategies on the test split", "",
              "| strategy | accuracy | macro-F1 | trainable params | frozen params | epochs | wall time (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s, r in results.items():
        trainable = " → ".join(f"{t:,}" for t in r.get("trainable_params_by_phase", [r["trainable_params"]]))
        lines.append(f"| {s} | {r['accuracy']:.4f} | {r['macro']['f1']:.4f} | {trainable} | "
                     f"{r['non_trainable_params']:,} | {r['epochs']} | {r['wall_time']:.1f} |")
    for b, r in baselines.items():
        lines.append(f"| *{b} (raw pixels, reference)* | {r['accuracy']:.4f} | {r['macro']['f1']:.4f} | "
                     f"{r['trainable_params']:,} | - | - | {r['wall_time']:.1f} |")
    if baselines:
        lines += ["", "Reference rows: scikit-learn on the target's raw pixels, the same training and test images "
                  "as the strategies, no augmentation — " + "; ".join(f"{b}: {r['method']}"
                                                                      for b, r in baselines.items()) + "."]
    scaled = [s for s in results if cfg.transfer.lr_scales(s)]
    if scaled:
        lines += ["", _lr_scales_line(cfg, scaled, model_name)]
    methods = method_lines(cfg.transfer, results, model_name)
    if methods:
        lines += ["", "Methods beyond freezing (`keras_transfer.methods`):", "", *methods]
    lines += ["", '<img src="comparison.png" alt="comparison">', "",
              '<img src="curves.png" alt="curves">', ""]
    best = max(results, key=lambda s: results[s]["accuracy"])
    lines += [f"## Best strategy: {best}", "", per_class_table(results[best]), "",
              f'<img src="strategies/{best}/confusion_matrix.png" alt="confusion matrix">', "",
              f'<img src="strategies/{best}/misclassified.png" alt="misclassified">', ""]
    if os.path.exists(os.path.join(run_dir, "augmentation.png")):
        lines += ["## Augmentation", "", '<img src="augmentation.png" alt="augmentation preview">', ""]
    lines += ["## Configuration", "", "```yaml", _yaml(to_dict(cfg)).rstrip(), "```", ""]
    write_report(run_dir, "\n".join(lines), f"keras-transfer: {source} -> {ds.name}")
    write_json(rundir.summary_path(run_dir), summary)  # last: its presence says the run finished (rundir.is_finished)


def baseline_verdict(results, baselines):
    """One or two sentences: does the best deep strategy beat the best classical baseline on raw pixels?"""
    best_b = max(baselines, key=lambda b: baselines[b]["accuracy"])
    b_acc = baselines[best_b]["accuracy"]
    best = max(results, key=lambda s: results[s]["accuracy"])
    acc = results[best]["accuracy"]
    n = baselines[best_b]["n"]
    se = float(np.sqrt(max(b_acc * (1 - b_acc), 1e-9) / n) * np.sqrt(2))
    delta = acc - b_acc
    if delta > 2 * se:
        return (f"The best deep strategy ({best}, {acc:.4f}) beat the best classical baseline on raw pixels "
                f"({best_b}, {b_acc:.4f}) by {delta * 100:+.1f} points.")
    if delta < -2 * se:
        return (f"**No deep strategy beat the classical baseline**: {best_b} on the raw pixels reached "
                f"{b_acc:.4f}, {-delta * 100:.1f} points above the best deep strategy ({best}, {acc:.4f}); on this "
                f"target the deep network, pretrained or not, did not earn its cost.")
    return (f"The best deep strategy ({best}, {acc:.4f}) and the best classical baseline on raw pixels "
            f"({best_b}, {b_acc:.4f}) are within noise ({delta * 100:+.1f} points, ~2 s.e. = {2 * se * 100:.1f}).")


def method_lines(t, results, model_name):
    """A bullet per method of ``keras_transfer.methods`` in ``results``: what it did, with its settings."""
    from keras_transfer.methods import check_surgical_block
    from keras_transfer.models import get_spec

    said = {
        "lp-ft": f"linear probe on the frozen backbone's cached features for {t.lp_epochs} epochs "
                 f"({results.get('lp-ft', {}).get('probe_wall_time', 0):.1f} s), then every block fine-tuned from "
                 f"that head (Kumar et al. 2022)",
        "l2sp": f"every block fine-tuned with α‖w − w₀‖² toward the pretrained weights (α = {t.l2sp_alpha:g}) and "
                f"β‖w‖² on the head's kernels (β = {t.l2sp_beta:g}) (Li et al. 2018)",
        "bss": f"every block fine-tuned with η × the {t.bss_k} smallest squared singular value(s) of each batch's "
               f"features added to the loss (η = {t.bss_eta:g}; Chen et al. 2019)",
        "bitfit": "only the backbone's biases and BatchNorm shifts train, with the head; BatchNorm statistics "
                  "re-estimated on the target",
        "norm-only": "only BatchNorm's scales and shifts train, with the head; BatchNorm statistics re-estimated "
                     "on the target",
        "surgical": f"only block {check_surgical_block(get_spec(model_name).blocks, t.surgical_block)} "
                    f"(`surgical_block: {t.surgical_block}`) trains, with the head (Lee et al. 2023)",
    }
    return [f"- **{s}**: {said[s]}." for s in results if s in said]


def _lr_scales_line(cfg, strategies, model_name):
    """One sentence: which strategies trained the backbone at which multiple of the head's learning rate."""
    from keras_transfer.transfer import block_lr_factors

    backbone_lr, decay = cfg.transfer.backbone_lr, cfg.transfer.layer_decay
    if decay == 1:
        rates = f"{backbone_lr:g}× the head's learning rate"
    else:
        factor = f"{decay:g}^d" if backbone_lr == 1 else f"{backbone_lr:g} × {decay:g}^d"
        (first, low), *_, (last, high) = block_lr_factors(model_name, backbone_lr, decay).items()
        rates = (f"{factor} times the head's learning rate, d blocks below the head: "
                 f"{last} {high:.3g}×, {first} {low:.3g}×")
    return (f"{', '.join(strategies)} trained the pretrained backbone at {rates} "
            f"(`transfer.backbone_lr`, `layer_decay`).")


def transfer_verdict(results):
    if "scratch" not in results:
        return "No scratch baseline was run, so this run cannot say whether transfer helped."
    if len(results) < 2:
        return "Only scratch was run (no transfer strategy), so this run does not measure transfer."
    base = results["scratch"]["accuracy"]
    others = {s: r["accuracy"] for s, r in results.items() if s != "scratch"}
    best = max(others, key=others.get)
    delta = others[best] - base
    n = results["scratch"]["n"]
    se = float(np.sqrt(max(base * (1 - base), 1e-9) / n) * np.sqrt(2))  # s.e. of a difference, two runs
    if delta > 2 * se:
        return (f"Transfer **beat** scratch: {best} reached {others[best]:.4f} vs {base:.4f} "
                f"(+{delta * 100:.1f} points; ~2 s.e. of the difference is {2 * se * 100:.1f} points, "
                f"one seed).")
    if delta < -2 * se:
        return (f"Transfer **did not** beat scratch: the best transfer strategy ({best}, {others[best]:.4f}) "
                f"is below scratch ({base:.4f}) by {-delta * 100:.1f} points (one seed).")
    return (f"Transfer and scratch are **within noise**: best transfer {best} {others[best]:.4f} vs scratch "
            f"{base:.4f} (difference {delta * 100:+.1f} points, ~2 s.e. = {2 * se * 100:.1f}; one seed).")


def _history(run_dir, strategy):
    from keras_transfer.callbacks import read_history

    return read_history(rundir.history_path(rundir.strategy_dir(run_dir, strategy)))


def _yaml(d):
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


# Config keys in which replicates of one experiment differ: not what makes two runs different experiments.
_REPLICATE_KEYS = {"seed", "data.data_dir", "transfer.pretrained", "transfer.strategies"}


def _run_config(d):
    """The run's ``config.yaml`` as ``{"section.key": value}`` (empty when it has none or it is unreadable)."""
    import yaml

    try:
        with open(rundir.config_path(d)) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    flat = {}
    for section, values in cfg.items():
        for k, v in (values.items() if isinstance(values, dict) else [(None, values)]):
            flat[f"{section}.{k}" if k else section] = v
    return flat


def _short(value):
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    if isinstance(value, str) and "/" in value:  # folder:/a/b/photos -> folder:photos
        kind, _, path = value.rpartition(":")
        return (kind + ":" if kind else "") + os.path.basename(path.rstrip("/"))
    return str(value)


def run_conditions(configs):
    """``{run: label}``: each run's experimental condition, named by the config keys in which the runs
    differ (``data.per_class=10, finetune.epochs=30``), leaving out the keys replicates differ in
    (`_REPLICATE_KEYS`: the seed, the data root, the pretrained file, which strategies ran). Runs that
    differ only there get the same label, ``""`` when all do.

    ``configs``: ``{run: {"section.key": value}}`` (`_run_config`).
    """
    keys = sorted({k for c in configs.values() for k in c} - _REPLICATE_KEYS)
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {run: ", ".join(f"{k}={_short(c.get(k, '-'))}" for k in differ) for run, c in configs.items()}


def clip_condition(label, most=3):
    """A condition label cut to its first ``most`` settings, for a figure or a terminal line."""
    parts = label.split(", ")
    return ", ".join(parts[:most] + (["..."] if len(parts) > most else []))


def collect_runs(run_dirs):
    """Rows ``(run, condition, strategy, model, backend, seed, accuracy, macro_f1, wall_time, trainable)``;
    ``condition``: see `run_conditions`."""
    configs = {d: _run_config(d) for d in run_dirs}
    conditions = run_conditions(configs)
    rows = []
    for d in run_dirs:
        seed, condition = configs[d].get("seed"), conditions[d]
        found = False
        for s in rundir.strategy_names(d):
            p = rundir.metrics_path(rundir.strategy_dir(d, s))
            if os.path.exists(p):
                rows.append(_row(d, _read_metrics(p), seed, s, condition))
                found = True
        if os.path.exists(rundir.metrics_path(d)):
            rows.append(_row(d, _read_metrics(rundir.metrics_path(d)), seed, "pretrain", condition))
            found = True
        if not found:
            from keras_transfer.errors import DataError

            raise DataError(f"Expected a run directory with metrics.json or strategies/*/metrics.json. "
                            f"Received: {d}")
    return rows


def _read_metrics(path):
    """A run's ``metrics.json``, or a one-line `DataError` naming the file that is not one."""
    from keras_transfer.errors import DataError

    try:
        m = read_json(path)
        float(m["accuracy"]), float(m["macro"]["f1"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"Expected a metrics.json with accuracy and macro-F1. Received: {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
    return m


def _row(d, m, seed, strategy, condition=""):
    return {"run": d, "condition": condition, "strategy": m.get("strategy", strategy), "model": m.get("model"),
            "backend": m.get("backend"), "seed": seed, "accuracy": m["accuracy"],
            "macro_f1": m["macro"]["f1"], "wall_time": m.get("wall_time", float("nan")),
            "trainable_params": m.get("trainable_params", 0)}


_ORDER = ("pretrain", "scratch", "linear", "partial", "full", "gradual", "lp-ft", "l2sp", "bss", "bitfit",
          "norm-only", "surgical")


def aggregate(rows, keys=("condition", "strategy", "model", "backend")):
    """Group rows by ``keys`` (a missing one counts as ``""``) and give mean and sample std (ddof=1; 0 for
    one run) per metric.

    Groups come in (model, backend, condition, strategy) order, strategies as in `STRATEGIES` after
    pretraining.
    A group whose runs also ran ``scratch`` gets ``vs_scratch`` / ``vs_scratch_std`` / ``vs_scratch_n``:
    the mean and sample std over those runs of its accuracy minus the same run's scratch accuracy
    (paired: same seed, same target subset), the comparison that cancels the run-to-run spread both
    share.
    """
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in keys), []).append(r)
    scratch = {(r["run"], r["model"], r["backend"]): r["accuracy"] for r in rows
               if r["strategy"] == "scratch" and "run" in r}
    out = []
    for key, rs in groups.items():
        agg = dict(zip(keys, key))
        agg["n"] = len(rs)
        for metric in ("accuracy", "macro_f1", "wall_time", "trainable_params"):
            v = np.array([r[metric] for r in rs], dtype=float)
            agg[metric] = float(v.mean())
            agg[f"{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        diffs = np.array([r["accuracy"] - scratch[(r["run"], r["model"], r["backend"])] for r in rs
                          if r["strategy"] not in ("scratch", "pretrain")
                          and (r.get("run"), r["model"], r["backend"]) in scratch])
        if len(diffs):
            agg.update(vs_scratch=float(diffs.mean()), vs_scratch_n=len(diffs),
                       vs_scratch_std=float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0)
        out.append(agg)
    rank = {s: i for i, s in enumerate(_ORDER)}
    return sorted(out, key=lambda a: (str(a.get("model")), str(a.get("backend")), str(a.get("condition")),
                                      rank.get(a.get("strategy"), len(rank)), str(a.get("strategy"))))


def mean_sd(a, metric, fmt):
    """``mean ± sd`` of a group's metric; the mean alone for a group of one run (no spread to show)."""
    mean = format(a[metric], fmt)
    return mean if a["n"] < 2 else f"{mean} ± {format(a[metric + '_std'], fmt)}"


def vs_scratch(a):
    """The paired difference to scratch in points, with its spread over two or more runs; "" without one."""
    if "vs_scratch" not in a:
        return ""
    sd = f" ± {100 * a['vs_scratch_std']:.1f}" if a["vs_scratch_n"] > 1 else ""
    return f"{100 * a['vs_scratch']:+.1f}{sd} points (n={a['vs_scratch_n']})"


def write_comparison(run_dirs, out_dir):
    rows = collect_runs(run_dirs)
    agg = aggregate(rows)
    write_json(os.path.join(out_dir, "comparison.json"), {"runs": rows, "groups": agg})
    # Labels name the condition, model and backend only where the groups differ in them.
    varied = [k for k in ("condition", "model", "backend") if len({a[k] for a in agg}) > 1]
    cond = "condition" in varied
    title = "Comparison across runs" + "".join(f", {agg[0][k]}" for k in ("model", "backend") if k not in varied)
    # Grouped bars: strategies along the axis, one colour per condition / model / backend, the same in every panel.
    group_of = [" / ".join(clip_condition(str(a[k]), 4) for k in varied) for a in agg]
    plots.study_bars_figure([{"condition": g, "strategy": a["strategy"], "kind": "deep",
                              **{m: {"mean": a[m], "sd": a[f"{m}_std"] if a["n"] > 1 else None}
                                 for m in ("accuracy", "macro_f1", "wall_time", "trainable_params")}}
                             for a, g in zip(agg, group_of)], list(dict.fromkeys(group_of)),
                            os.path.join(out_dir, "comparison.png"), title=title)
    lines = ["# Comparison across runs", "", f"{len(run_dirs)} run(s): " + ", ".join(run_dirs), "",
             ("| condition " if cond else "") + "| strategy | model | backend | n | accuracy | vs scratch (paired) | "
             "macro-F1 | wall time (s) | trainable params |",
             ("|---" if cond else "") + "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        lines.append((f"| {a['condition']} " if cond else "") +
                     f"| {a['strategy']} | {a['model']} | {a['backend']} | {a['n']} | "
                     f"{mean_sd(a, 'accuracy', '.4f')} | {vs_scratch(a)} | {mean_sd(a, 'macro_f1', '.4f')} | "
                     f"{mean_sd(a, 'wall_time', '.1f')} | {int(a['trainable_params']):,} |")
    lines += ["", "Mean ± sample standard deviation over the runs of a group (the mean alone for one run). "
              "\"vs scratch\": the accuracy minus the same run's scratch baseline (same seed and target images), "
              "averaged over runs; its spread is the one to read against the difference. Trainable parameters: "
              "those a strategy trains (gradual: in its last phase)."
              + (" Condition: the settings in which the runs' config.yaml differ, other than the seed, the data "
                 "root, the pretrained file and the strategies run; runs of one condition are its replicates."
                 if cond else ""), "",
              '<img src="comparison.png" alt="comparison">', ""]
    write_report(out_dir, "\n".join(lines), "keras-transfer comparison")
    return agg
