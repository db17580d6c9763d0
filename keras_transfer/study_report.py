"""The study report: every number read back from the runs' own ``metrics.json`` / ``summary.json``,
aggregated over seeds per condition and strategy, with paired differences, ranks and figures.
"""

from __future__ import annotations

import math
import os

import numpy as np

from keras_transfer import plots, rundir
from keras_transfer.io import atomic_write_text, read_json, write_json
from keras_transfer.report import markdown_to_html

METRICS = ("accuracy", "macro_f1", "wall_time", "trainable_params", "peak_host_mb", "peak_device_mb",
           "train_val_gap")


def _last(history, key):
    v = history.get(key) or []
    return float(v[-1]) if len(v) else None


def run_rows(study, study_dir):
    """``(rows, runs)``: a row per finished run and strategy (classical baselines included, ``kind``
    ``baseline``), and every run's state and error."""
    from keras_transfer.callbacks import read_history
    from keras_transfer.study import plan, run_path
    from keras_transfer.study_run import read_error

    states = {d: s for _, _, d, s in plan(study, study_dir)}
    rows, runs = [], []
    for r in study.runs:
        d = run_path(study_dir, r)
        state = states[d]
        runs.append({"name": r.name, "dir": d, "condition": r.label, "seed": r.seed, "state": state,
                     "error": read_error(d) if state == "failed" else None,
                     "pretrain": r.pretrain})
        if state != "finished":
            continue
        summary = read_json(rundir.summary_path(d))
        base = {"run": r.name, "condition": r.label, "settings": r.condition, "seed": r.seed}
        for s in summary["strategies"]:
            stage = rundir.strategy_dir(d, s)
            m = read_json(rundir.metrics_path(stage))
            h = read_history(rundir.history_path(stage)) if os.path.exists(rundir.history_path(stage)) else {}
            train, val = _last(h, "accuracy"), _last(h, "val_accuracy")
            rows.append({**base, "strategy": s, "kind": "deep", "accuracy": m["accuracy"],
                         "macro_f1": m["macro"]["f1"], "wall_time": m["wall_time"],
                         "trainable_params": m["trainable_params"], "peak_host_mb": m.get("peak_host_mb"),
                         "peak_device_mb": m.get("peak_device_mb"), "peak_device_scope": m.get("peak_device_scope"),
                         "train_accuracy": train, "val_accuracy": val,
                         "train_val_gap": None if train is None or val is None else train - val,
                         "per_class": m.get("per_class"), "confusion_matrix": m.get("confusion_matrix")})
        for b, m in (summary.get("baselines") or {}).items():
            rows.append({**base, "strategy": b, "kind": "baseline", "accuracy": m["accuracy"],
                         "macro_f1": m["macro_f1"], "wall_time": m["wall_time"], "trainable_params": None,
                         "peak_host_mb": None, "peak_device_mb": None, "peak_device_scope": None,
                         "train_accuracy": None,
                         "val_accuracy": None, "train_val_gap": None})
    return rows, runs


def per_class(rows):
    """Per condition and deep strategy, per class: precision, recall and F1 (mean over seeds) and the confusion
    matrix summed over seeds. ``{condition: {strategy: {"classes", "precision", "recall", "f1", "confusion", "n"}}}``;
    rows without per-class metrics are left out."""
    out = {}
    for r in rows:
        if r["kind"] != "deep" or not r.get("per_class") or r.get("confusion_matrix") is None:
            continue
        out.setdefault(r["condition"], {}).setdefault(r["strategy"], []).append(r)
    summary = {}
    for condition, by_strategy in out.items():
        for strategy, rs in by_strategy.items():
            classes = [c["class"] for c in rs[0]["per_class"]]
            if any([c["class"] for c in r["per_class"]] != classes for r in rs):
                continue  # runs that disagree on the classes are not averaged
            summary.setdefault(condition, {})[strategy] = {
                "classes": classes, "n": len(rs),
                **{k: np.mean([[c[k] for c in r["per_class"]] for r in rs], 0).tolist()
                   for k in ("precision", "recall", "f1")},
                "confusion": np.sum([np.asarray(r["confusion_matrix"]) for r in rs], 0).tolist()}
    return summary


def _t95(n):
    """The two-sided 95% quantile of Student's t with ``n - 1`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def summarise(values):
    """``{"mean", "sd", "ci95", "n"}`` of a sample: sample sd (ddof=1) and the half-width of the 95%
    confidence interval of the mean (t distribution); sd and interval None for one value."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    n = len(v)
    if not n:
        return {"mean": None, "sd": None, "ci95": None, "n": 0}
    sd = float(v.std(ddof=1)) if n > 1 else None
    return {"mean": float(v.mean()), "sd": sd, "ci95": _t95(n) * sd / math.sqrt(n) if n > 1 else None, "n": n}


def aggregate(rows, reference, grid_keys=(), conditions=None):
    """A group per (condition, strategy), in the study's order: every metric summarised over seeds, and the
    paired differences of accuracy to the same run's scratch (``vs_scratch``), to each raw-pixel baseline of
    the same run (``vs_baseline``) and to the same seed and strategy in the condition's reference
    (``vs_reference``): the condition with the keys of ``reference`` (a ``{grid key: value}``) set to its
    values, the others kept, so each slice of the grid is compared with its own reference (`study.reference_of`;
    ``grid_keys``: the study's grid, as opposed to its listed conditions; ``conditions``: every condition's settings,
    finished or not, so the reference a condition is compared with does not depend on which runs have finished)."""
    from keras_transfer.study import condition_label, reference_of

    groups = {}
    for r in rows:
        groups.setdefault((r["condition"], r["strategy"]), []).append(r)
    by_run = {(r["run"], r["strategy"]): r for r in rows}
    by_seed = {(r["condition"], r["strategy"], r["seed"]): r for r in rows}
    settings = conditions if conditions is not None else list({r["condition"]: r["settings"] for r in rows}.values())
    out = []
    for (condition, strategy), rs in groups.items():
        g = {"condition": condition, "strategy": strategy, "kind": rs[0]["kind"], "settings": rs[0]["settings"],
             "n": len(rs), "device_scope": rs[0].get("peak_device_scope")}
        ref = reference_of(rs[0]["settings"], reference, settings, grid_keys)
        reference_label = condition_label(ref) if ref is not None else None
        g["reference"] = reference_label
        for m in METRICS:
            g[m] = summarise([r[m] for r in rs])
        if strategy != "scratch":
            diffs = [r["accuracy"] - by_run[(r["run"], "scratch")]["accuracy"] for r in rs
                     if (r["run"], "scratch") in by_run]
            if diffs:
                g["vs_scratch"] = summarise(diffs)
        if rs[0]["kind"] == "deep":  # against each raw-pixel baseline of the same run
            baselines = sorted({b for (run, b), row in by_run.items() if row["kind"] == "baseline"})
            for b in baselines:
                diffs = [r["accuracy"] - by_run[(r["run"], b)]["accuracy"] for r in rs if (r["run"], b) in by_run]
                if diffs:
                    g.setdefault("vs_baseline", {})[b] = summarise(diffs)
        if reference_label is not None and condition != reference_label:
            diffs = [r["accuracy"] - by_seed[(reference_label, strategy, r["seed"])]["accuracy"] for r in rs
                     if (reference_label, strategy, r["seed"]) in by_seed]
            if diffs:
                g["vs_reference"] = summarise(diffs)
        out.append(g)
    return out


def _pm(s, fmt=".4f", scale=1.0):
    if s is None or s["mean"] is None:
        return "-"
    mean = format(s["mean"] * scale, fmt)
    return mean if s["sd"] is None else f"{mean} ± {format(s['sd'] * scale, fmt)}"


def _ci(s, fmt=".4f", scale=1.0):
    if s is None or s.get("ci95") is None:
        return "-"
    lo, hi = (s["mean"] - s["ci95"]) * scale, (s["mean"] + s["ci95"]) * scale
    return f"[{format(lo, fmt)}, {format(hi, fmt)}]"


def _diff(s):
    """A paired difference in points: mean ± sd [95% CI] (n)."""
    if s is None:
        return "-"
    text = f"{100 * s['mean']:+.1f}"
    if s["sd"] is not None:
        text += f" ± {100 * s['sd']:.1f} [{100 * (s['mean'] - s['ci95']):+.1f}, {100 * (s['mean'] + s['ci95']):+.1f}]"
    return text + f" (n={s['n']})"


def _num(s, fmt):
    return "-" if s is None or s["mean"] is None else format(s["mean"], fmt)


def numeric_axes(grid):
    """The grid keys whose values are all numbers (not booleans), with at least two values."""
    return [k for k, vs in grid.items()
            if len(vs) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)]


def write_study_report(study, study_dir):
    """Write ``study.json``, ``study.md``, ``study.html`` and the figures; return the report's data."""
    rows, runs = run_rows(study, study_dir)
    from keras_transfer.study import condition_label

    reference = condition_label(study.reference)
    groups = aggregate(rows, study.reference, list(study.grid),
                       list({r.label: r.condition for r in study.runs}.values()))
    ranking = sorted([g for g in groups if g["accuracy"]["mean"] is not None],
                     key=lambda g: -g["accuracy"]["mean"])
    figures, figure_errors = [], []

    def figure(name, draw, *args, **kwargs):  # a figure that cannot be drawn must not cost the report
        try:
            draw(*args, os.path.join(study_dir, name), **kwargs)
            figures.append(name)
        except (ValueError, MemoryError, OverflowError) as e:
            figure_errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    if groups:
        figure("study_bars.png", plots.study_bars_figure, groups, study.conditions,
               title=f"{study.name}: mean ± sd over seeds, per condition")
        for key in numeric_axes(study.grid):
            figure(f"study_{key.replace('.', '_')}.png", plots.study_axis_figure, groups, key,
                   [k for k in study.keys if k != key], title=f"{study.name}: accuracy against {key}")
    classes = per_class(rows)
    confusion_figures = {}
    for i, (condition, by_strategy) in enumerate(classes.items()):
        name = f"study_confusion_{i}.png"
        figure(name, plots.confusion_grid_figure,
               {s: v["confusion"] for s, v in by_strategy.items()}, next(iter(by_strategy.values()))["classes"],
               title=f"{study.name}, {condition or '(base)'}: confusion matrices summed over seeds (row-normalised)")
        if name in figures:
            figures.remove(name)  # shown in its condition's per-class section
            confusion_figures[condition] = name
    states = [r["state"] for r in runs]
    data = {"study": study.document, "reference": reference, "figure_errors": figure_errors, "runs": runs,
            "rows": rows, "groups": groups, "per_class": classes,
            "ranking": [{"condition": g["condition"], "strategy": g["strategy"], "accuracy": g["accuracy"]}
                        for g in ranking],
            "finished": states.count("finished"), "total": len(runs)}
    write_json(os.path.join(study_dir, "study.json"), data)
    md = _markdown(study, study_dir, data, groups, ranking, figures, confusion_figures)
    atomic_write_text(os.path.join(study_dir, "study.md"), md)
    atomic_write_text(os.path.join(study_dir, "study.html"), markdown_to_html(md, study_dir, f"study {study.name}"))
    return data


def _markdown(study, study_dir, data, groups, ranking, figures, confusion_figures=None):
    from keras_transfer.study import condition_label

    runs = data["runs"]
    failed = [r for r in runs if r["state"] == "failed"]
    waiting = [r for r in runs if r["state"] in ("missing", "partial")]
    b = study.base
    lines = [f"# Study: {study.name}", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [f"Study file `{study.path}`; {len(study.conditions)} condition(s) × {len(study.seeds)} seed(s) "
              f"({', '.join(map(str, study.seeds))}) = {len(runs)} runs, **{data['finished']} finished**"
              + (f", {len(failed)} failed" if failed else "") + (f", {len(waiting)} not run yet" if waiting else "")
              + ".", "",
              "Base configuration: " + ", ".join(
                  f"{what} {value}" + (" (varied by the study)" if key in study.keys else "")
                  for what, key, value in (("source", "data.source", b.data.source),
                                           ("target", "data.target", b.data.target),
                                           ("model", "model.name", b.model.name),
                                           ("strategies", "transfer.strategies", ", ".join(b.transfer.strategies))))
              + (f", pretrained model `{b.transfer.pretrained}`" if b.transfer.pretrained else "")
              + "; classical baselines on raw pixels: " + (", ".join(b.transfer.baselines) or "none") + ".", ""]
    if study.keys:
        ref = ", ".join(f"{k}={v}" for k, v in study.reference.items())
        listed = ("Conditions listed: " + "; ".join(condition_label(c) for c in study.listed)
                  + (", each crossed with the grid. " if study.grid else ". ")) if study.listed else ""
        grid = ("Grid: " + "; ".join(f"`{k}` ∈ {v}" for k, v in study.grid.items()) + ". ") if study.grid else ""
        lines += [listed + grid + f"Reference: **{ref}** (each condition is compared with the condition that has "
                  "these values and its own values of the other keys).", ""]
    if not groups:
        lines += ["No run has finished yet.", ""]
    else:
        lines += ["## Top configurations", "", "| rank | condition | strategy | accuracy (mean ± sd) | 95% CI | n |",
                  "|---:|---|---|---:|---:|---:|"]
        for i, g in enumerate(ranking[:10], 1):
            strategy = g["strategy"] + (" (raw pixels)" if g["kind"] == "baseline" else "")
            lines.append(f"| {i} | {g['condition'] or '(base)'} | {strategy} | {_pm(g['accuracy'])} | "
                         f"{_ci(g['accuracy'])} | {g['n']} |")
        lines += ["", "## Every condition and strategy", "",
                  "| condition | strategy | n | accuracy | 95% CI | vs scratch (paired, points) | "
                  "vs reference (paired, points) | macro-F1 | train − val accuracy | trainable params | "
                  "wall time (s) | peak host memory (MB) | peak device memory (MB) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in groups:
            strategy = f"*{g['strategy']} (raw pixels)*" if g["kind"] == "baseline" else g["strategy"]
            lines.append(f"| {g['condition'] or '(base)'} | {strategy} | {g['n']} | {_pm(g['accuracy'])} | "
                         f"{_ci(g['accuracy'])} | {_diff(g.get('vs_scratch'))} | {_diff(g.get('vs_reference'))} | "
                         f"{_pm(g['macro_f1'])} | {_pm(g['train_val_gap'], '.3f')} | "
                         f"{_num(g['trainable_params'], ',.0f')} | {_pm(g['wall_time'], '.1f')} | "
                         f"{_num(g['peak_host_mb'], ',.0f')} | {_num(g['peak_device_mb'], ',.0f')}"
                         f"{'†' if g.get('device_scope') == 'process' and g['peak_device_mb']['mean'] else ''} |")
        lines += ["", "Mean ± sample standard deviation over seeds; 95% CI: the t interval of the mean. Paired "
                  "differences are taken run by run and then averaged: *vs scratch*, a strategy minus the same "
                  "run's scratch (same seed and target images); *vs reference*, a condition minus the reference "
                  "condition for the same strategy and seed; shown as mean ± sd [95% CI]. An interval that "
                  "includes 0 means the difference is not resolved by these seeds. Train − val accuracy: the "
                  "last epoch's gap (overfitting). Raw-pixel rows: scikit-learn on the same training and test "
                  "images, no network. Peak host memory: the process's resident high-water mark during the "
                  "strategy, which includes what the process already held (the data, earlier models); † device "
                  "memory whose peak the backend cannot reset (JAX): the running maximum of the process, so of "
                  "every run before it in the same process.", ""]
        lines += _verdict_lines(groups)
        for f in figures:
            lines += [f'<img src="{f}" alt="{f}">', ""]
        for e in data["figure_errors"]:
            lines += [f"Figure not drawn: {e}", ""]
        lines += _per_class_lines(data["per_class"], confusion_figures or {})
    if failed:
        lines += ["## Failed runs", "", "| run | error |", "|---|---|"]
        lines += [f"| {r['name']} | {r['error']} |" for r in failed] + [""]
    lines += ["## Runs", "", "| run | condition | seed | state |", "|---|---|---:|---|"]
    lines += [f"| [{r['name']}](runs/{r['name']}/report.html) | {r['condition'] or '(base)'} | {r['seed']} | "
              f"{r['state']} |" for r in runs]
    lines += ["", "## Study file as resolved", "", "```yaml",
              _yaml({k: v for k, v in study.document.items() if k != "base"}).rstrip(), "```", "",
              "<details><summary>Base configuration</summary>", "", "```yaml", _yaml(study.document["base"]).rstrip(),
              "```", "", "</details>", ""]
    return "\n".join(lines)


def _per_class_lines(classes, confusion_figures):
    """The per-class section: per condition, each class's F1 under each strategy (mean over seeds), the best
    strategy's precision and recall, and the confusion matrices summed over seeds."""
    if not classes:
        return []
    lines = ["## Per class", "", "F1 per class and strategy (mean over seeds); precision and recall of the strategy "
             "with the highest macro-F1; confusion matrices summed over the seeds' test predictions.", ""]
    for condition, by_strategy in classes.items():
        strategies = list(by_strategy)
        best = max(strategies, key=lambda s: np.mean(by_strategy[s]["f1"]))
        b = by_strategy[best]
        lines += [f"### {condition or '(base)'}", "",
                  "| class | " + " | ".join(f"{s} F1" for s in strategies) + f" | {best} precision | {best} recall |",
                  "|---|" + "---:|" * (len(strategies) + 2)]
        for i, c in enumerate(b["classes"]):
            lines.append(f"| {c} | " + " | ".join(
                (f"**{by_strategy[s]['f1'][i]:.3f}**" if s == best else f"{by_strategy[s]['f1'][i]:.3f}")
                for s in strategies) + f" | {b['precision'][i]:.3f} | {b['recall'][i]:.3f} |")
        worst = int(np.argmin(b["f1"]))
        lines += ["", f"Hardest class for {best}: {b['classes'][worst]} (F1 {b['f1'][worst]:.3f}).", ""]
        if condition in confusion_figures:
            lines += [f'<img src="{confusion_figures[condition]}" alt="confusion matrices">', ""]
    return lines


def _verdict_lines(groups):
    """Per condition: the best transfer strategy against scratch, and the best deep strategy (scratch
    included) against the best raw-pixel baseline, both as paired differences with their intervals."""
    def verdict(vs):
        if vs is None or vs["ci95"] is None:
            return "not resolved (one seed)" if vs is not None else "no paired runs"
        if vs["mean"] - vs["ci95"] > 0:
            return "above"
        if vs["mean"] + vs["ci95"] < 0:
            return "**below**"
        return "not distinguishable from"

    out = []
    for condition in dict.fromkeys(g["condition"] for g in groups):
        gs = [g for g in groups if g["condition"] == condition and g["accuracy"]["mean"] is not None]
        deep = [g for g in gs if g["kind"] == "deep"]
        transfer = [g for g in deep if g["strategy"] != "scratch"]
        base = [g for g in gs if g["kind"] == "baseline"]
        parts = []
        if transfer:
            t = max(transfer, key=lambda g: g["accuracy"]["mean"])
            vs = t.get("vs_scratch")
            if vs is not None:
                parts.append(f"best transfer strategy {t['strategy']} {_pm(t['accuracy'])} is {verdict(vs)} "
                             f"scratch ({_diff(vs)})")
            else:
                parts.append(f"best transfer strategy {t['strategy']} {_pm(t['accuracy'])} (no scratch runs)")
        if deep and base:
            b = max(base, key=lambda g: g["accuracy"]["mean"])
            d = max(deep, key=lambda g: g["accuracy"]["mean"])
            vs = (d.get("vs_baseline") or {}).get(b["strategy"])
            word = verdict(vs)
            if word == "**below**" or (d["accuracy"]["mean"] < b["accuracy"]["mean"] and word != "above"):
                parts.append(f"**no deep strategy, scratch included, beats {b['strategy']} on raw pixels** "
                             f"({b['strategy']} {_pm(b['accuracy'])}; the best, {d['strategy']}, is {word} it: "
                             f"{_diff(vs)})")
            else:
                parts.append(f"the best deep strategy {d['strategy']} is {word} the best raw-pixel baseline "
                             f"({b['strategy']} {_pm(b['accuracy'])}; {_diff(vs)})")
        if parts:
            out.append(f"- **{condition or '(base)'}**: " + "; ".join(parts) + ".")
    return (["## What it shows", ""] + out + [""]) if out else []


def _yaml(d):
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
