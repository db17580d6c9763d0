"""Figures (matplotlib, Agg): confusion matrix, curves, galleries, comparisons, Grad-CAM."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402,F401
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

from keras_transfer.io import save_figure  # noqa: E402


def _show(ax, img):
    img = np.asarray(img)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.clip(img, 0, 255).astype(np.uint8))
    ax.set_xticks([])
    ax.set_yticks([])


def confusion_matrix_figure(cm, class_names, path, title="Confusion matrix (row-normalised)"):
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= 26:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    save_figure(fig, path)
    plt.close(fig)


def confusion_grid_figure(matrices, class_names, path, title="Confusion matrices (row-normalised)"):
    """One row-normalised confusion matrix per panel, ``matrices``: ``{label: counts}`` (true class along rows),
    at most four panels per row; counts written in the cells for up to 12 classes."""
    k = len(class_names)
    n = len(matrices)
    if not n:
        raise ValueError("no confusion matrix to draw")
    cols = min(n, 4)
    rows = -(-n // cols)
    side = max(3.2, 0.3 * k + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows + 0.6), layout="constrained",
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (label, cm) in zip(axes.flat, matrices.items()):
        cm = np.asarray(cm, dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ticks = class_names if k <= 26 else [""] * k
        ax.set_xticks(range(k), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(k), ticks, fontsize=7)
        ax.set_title(f"{label}: {np.trace(cm) / max(cm.sum(), 1):.3f}", fontsize=9)
        ax.set_xlabel("predicted class", fontsize=8)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.5 else "black")
    axes.flat[0].set_ylabel("true class")
    fig.colorbar(im, ax=list(axes.flat), fraction=0.02, label="fraction of true class")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def curves_figure(histories, path, title="Training curves"):
    """``histories``: ``{label: {"loss": [...], "val_loss": [...], "accuracy": [...], ...}}``; a third
    panel shows ``learning_rate`` when any history has it (log scale unless a rate is 0)."""
    keys = ["loss", "accuracy"] + (["learning_rate"] if any("learning_rate" in h for h in histories.values()) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), layout="constrained")
    for (label, h), color in zip(histories.items(), plt.cm.tab10.colors):
        epochs = np.arange(1, len(h.get("loss", [])) + 1)
        for ax, key in zip(axes, keys):
            if key in h:
                ax.plot(epochs, h[key], "-" if key == "learning_rate" else "--", color=color,
                        label=label if key == "learning_rate" else f"{label} train")
            if f"val_{key}" in h:
                ax.plot(epochs, h[f"val_{key}"], "-", color=color, label=f"{label} val")
    for ax, key in zip(axes, keys):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    rates = [r for h in histories.values() for r in h.get("learning_rate", [])]
    if rates and min(rates) > 0:  # a schedule that ends at 0 stays on a linear axis
        axes[2].set_yscale("log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def misclassified_figure(x, y_true, probs, class_names, path, max_images=24, title=None):
    """Grid of misclassified images, most confident mistakes first."""
    y_pred = probs.argmax(1)
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:max_images]
    n = max(len(wrong), 1)
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.axis("on")
        _show(ax, x[i])
        ax.set_title(f"true {class_names[y_true[i]]}\npred {class_names[y_pred[i]]} "
                     f"{probs[i, y_pred[i]]:.0%}", fontsize=7, color="firebrick")
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title or f"Misclassified test images ({len(np.flatnonzero(y_pred != y_true))} in all)")
    save_figure(fig, path)
    plt.close(fig)


def augmentation_figure(original, augmented, path, title="Augmentation preview"):
    """Rows: one original image then its augmented versions."""
    rows, cols = len(original), augmented.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], original[r])
        for c in range(1, cols):
            _show(axes[r, c], augmented[r, c - 1])
    axes[0, 0].set_title("original", fontsize=8)
    for c in range(1, cols):
        axes[0, c].set_title(f"sample {c}", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def comparison_figure(rows, path, title="Strategy comparison"):
    """Bar charts of accuracy, macro-F1, wall time and trainable params per row.

    ``rows``: list of dicts with ``label``, ``accuracy``, ``macro_f1``, ``wall_time``,
    ``trainable_params``, optional ``accuracy_std``/``macro_f1_std``, and optional ``group`` (compare's
    condition): rows of one group share a colour, named in a legend. Rows with ``reference`` (the classical
    baselines) are drawn hatched in grey, and their best accuracy as a dashed line across the accuracy panel.
    """
    labels = [r["label"] for r in rows]
    groups = list(dict.fromkeys(r.get("group", "") for r in rows))
    grouped = len(groups) > 1
    panels = [("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"),
              ("wall_time", "wall time (s)"), ("trainable_params", "trainable parameters")]
    fig, axes = plt.subplots(1, 4, figsize=(4 * max(4.0, 0.45 * len(rows)), 3.6 + 0.25 * grouped * len(groups)),
                             layout="constrained")
    palette = plt.cm.tab10.colors
    colors = ([palette[groups.index(r.get("group", "")) % 10] for r in rows] if grouped
              else [palette[i % 10] for i in range(len(rows))])
    colors = ["0.8" if r.get("reference") else c for r, c in zip(rows, colors)]
    hatches = ["//" if r.get("reference") else "" for r in rows]
    reference_acc = [r["accuracy"] for r in rows if r.get("reference")]
    for ax, (key, name) in zip(axes, panels):
        vals = [r.get(key, np.nan) for r in rows]
        errs = [r.get(f"{key}_std", 0.0) for r in rows]
        bars = ax.bar(range(len(rows)), vals, yerr=errs if any(errs) else None, color=colors, capsize=3,
                      hatch=hatches, edgecolor="0.4" if reference_acc else None)
        if key == "accuracy" and reference_acc:
            ax.axhline(max(reference_acc), color="0.3", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_title(name)
        if key == "trainable_params":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        for b, v in zip(bars, vals):
            txt = f"{v:.3f}" if key in ("accuracy", "macro_f1") else (f"{v:.1f}" if key == "wall_time"
                                                                      else f"{int(v):,}")
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), txt, ha="center", va="bottom", fontsize=7)
        if key in ("accuracy", "macro_f1"):
            ax.set_ylim(0, 1.05)
    if grouped:
        handles = [matplotlib.patches.Patch(color=palette[i % 10], label=g or "(none)") for i, g in enumerate(groups)]
        fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def gradcam_figure(images, heatmaps, titles, path, title="Grad-CAM"):
    n = len(images)
    cols = min(6, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, hm, t in zip(axes.flat, images, heatmaps, titles):
        h, w = img.shape[:2]
        _show(ax, img)
        ax.imshow(hm, cmap="jet", alpha=0.45, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=0, vmax=1)
        ax.set_title(t, fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def gradcam_compare_figure(images, heatmaps, titles, row_titles, path, title="Grad-CAM"):
    """One row per image: the image alone, then each model's heatmap beside it (alone, so a small image is
    not hidden under an overlay), with each model's prediction above its heatmap.

    ``heatmaps`` / ``titles``: ``{model label: (N, H, W) array / N titles}``; ``row_titles``: N labels."""
    labels = list(heatmaps)
    n, cols = len(images), 1 + len(labels)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.4), squeeze=False, layout="constrained")
    for i, img in enumerate(images):
        _show(axes[i, 0], img)
        axes[i, 0].set_title(row_titles[i], fontsize=7)
        for j, label in enumerate(labels, 1):
            ax = axes[i, j]
            ax.imshow(heatmaps[label][i], cmap="jet", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {titles[label][i]}", fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


# Fixed colours per strategy, so a strategy looks the same in every study figure.
_STRATEGY_COLORS = {"scratch": "#555555", "linear": "#1f77b4", "partial": "#ff7f0e", "full": "#2ca02c",
                    "gradual": "#d62728", "lp-ft": "#9467bd", "l2sp": "#8c564b", "bss": "#e377c2",
                    "bitfit": "#bcbd22", "norm-only": "#17becf", "surgical": "#7f7f7f",
                    "logreg": "#999999", "knn": "#bbbbbb"}


def _strategy_color(name, i):
    return _STRATEGY_COLORS.get(name, plt.cm.tab10.colors[(i + 4) % 10])


def study_bars_figure(groups, conditions, path, title="Study"):
    """Grouped bars: strategies along each panel's x axis, one bar per condition within a strategy, one
    colour per condition (the same in every panel), error bars the sd over seeds; raw-pixel baselines
    hatched. Panels: accuracy, macro-F1, wall time, trainable parameters.

    ``groups``: `keras_transfer.study_report.aggregate`'s (``condition``, ``strategy``, ``kind`` and a
    ``{"mean", "sd"}`` per metric). ``conditions``: their order (colours follow it).
    """
    strategies = list(dict.fromkeys(g["strategy"] for g in groups))
    conditions = [c for c in conditions if any(g["condition"] == c for g in groups)]
    by = {(g["condition"], g["strategy"]): g for g in groups}
    kinds = {g["strategy"]: g["kind"] for g in groups}
    panels = [("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"), ("wall_time", "wall time (s)"),
              ("trainable_params", "trainable parameters")]
    n_c = max(1, len(conditions))
    width = 0.8 / n_c
    fig, axes = plt.subplots(1, 4, figsize=(min(60, max(16, 1.1 * len(strategies) * 4 * max(1, n_c / 4))),
                                            4.2 + 0.22 * min(n_c, 30)), layout="constrained")
    palette = plt.cm.tab20.colors if n_c > 10 else plt.cm.tab10.colors
    for ax, (key, name) in zip(axes, panels):
        for j, c in enumerate(conditions):
            xs, vals, errs, hatches = [], [], [], []
            for i, s in enumerate(strategies):
                g = by.get((c, s))
                if g is None or g[key]["mean"] is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                vals.append(g[key]["mean"])
                errs.append(g[key]["sd"] or 0.0)
                hatches.append("//" if kinds[s] == "baseline" else "")
            if xs:
                ax.bar(xs, vals, width * 0.95, yerr=errs if any(errs) else None, color=palette[j % len(palette)],
                       hatch=hatches, edgecolor="0.3", linewidth=0.4, capsize=2, label=c or "(base)")
        ax.set_xticks(range(len(strategies)),
                      [s + (" (pixels)" if kinds[s] == "baseline" else "") for s in strategies],
                      rotation=30, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        if key in ("accuracy", "macro_f1"):
            ax.set_ylim(0, 1.05)
        if key == "trainable_params":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if len(conditions) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=1 if n_c <= 6 else 2, fontsize=8,
                   frameon=False)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def study_axis_figure(groups, key, other_keys, path, title=None, max_panels=9):
    """Accuracy (mean ± sd over seeds) against a numeric grid axis ``key``, one line per strategy (raw-pixel
    baselines dashed), one panel per combination of the other grid keys' values (at most ``max_panels``).

    ``groups``: as `study_bars_figure`, with ``settings`` (the condition's ``{key: value}``)."""
    def rest(g):
        return tuple((k, repr(g["settings"].get(k))) for k in other_keys)

    panels = list(dict.fromkeys(rest(g) for g in groups))[:max_panels]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    strategies = list(dict.fromkeys(g["strategy"] for g in groups))
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(strategies):
            pts = sorted((g["settings"][key], g["accuracy"]["mean"], g["accuracy"]["sd"] or 0.0, g["kind"])
                         for g in groups if g["strategy"] == s and rest(g) == panel
                         and g["accuracy"]["mean"] is not None)
            if not pts:
                continue
            x, y, e, kind = zip(*pts)
            ax.errorbar(x, y, yerr=e if any(e) else None, marker="o", capsize=3, color=_strategy_color(s, i),
                        linestyle="--" if kind[0] == "baseline" else "-",
                        label=s + (" (pixels)" if kind[0] == "baseline" else ""))
        values = sorted({g["settings"][key] for g in groups})
        if len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.set_title(", ".join(f"{k}={v}" for k, v in panel), fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or f"accuracy against {key}")
    save_figure(fig, path)
    plt.close(fig)
