"""Metrics of a classifier on a labelled split (scikit-learn), as JSON-ready dicts."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from keras_transfer.config import TTA_MODES


def predict_logits(model, x, batch_size=256):
    from keras_transfer.distribute import predict

    return np.asarray(predict(model, x, batch_size), dtype=np.float64)


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true, probs, class_names, top_k=(1, 5)):
    """Accuracy, top-k, per-class precision/recall/F1 (macro and weighted), confusion matrices.

    Args:
        y_true: int array (N,).
        probs: float array (N, K). Scores or probabilities.
        class_names: list of str (K).
        top_k: ks for top-k accuracy (ks >= K are skipped).
    """
    y_true = np.asarray(y_true)
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "top_k": {str(t): float(skm.top_k_accuracy_score(y_true, probs, k=t, labels=labels))
                  for t in top_k if 1 < t < k},
        "per_class": [{"class": class_names[i], "precision": float(p[i]), "recall": float(r[i]),
                       "f1": float(f[i]), "support": int(s[i])} for i in labels],
    }
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                            zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_normalized"] = np.round(
        cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), 4).tolist()
    return out


def _flip_logits(model, x, batch_size):
    return (predict_logits(model, x, batch_size)
            + predict_logits(model, np.ascontiguousarray(x[:, :, ::-1]), batch_size)) / 2


def tta_logits(model, x, batch_size=256, tta="none"):
    """Logits of ``model`` on uint8 images ``x`` under test-time augmentation ``tta``.

    ``flip``: mean of the logits of each image and its left-right mirror. ``flip_translate``
    (airbench94's multi-crop TTA): half the ``flip`` logits plus half the mean ``flip`` logits
    of the image shifted one pixel up-left and one pixel down-right (reflect padding).
    """
    if tta not in TTA_MODES:
        from keras_transfer.errors import ConfigError

        raise ConfigError(f"Unknown test-time augmentation: expected one of {', '.join(TTA_MODES)}. "
                          f"Received: {tta!r}")
    if tta == "none":
        return predict_logits(model, x, batch_size)
    logits = _flip_logits(model, x, batch_size)
    if tta == "flip_translate":
        h, w = x.shape[1:3]
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        shifted = [np.ascontiguousarray(padded[:, dy:dy + h, dx:dx + w]) for dy, dx in ((0, 0), (2, 2))]
        logits = 0.5 * logits + 0.25 * sum(_flip_logits(model, s, batch_size) for s in shifted)
    return logits


def evaluate_model(model, x, y, class_names, batch_size=256, tta="none"):
    """Run ``model`` on uint8 images and return `(metrics, probs)`.

    Args:
        tta: str. Test-time augmentation (`tta_logits`): ``none``, ``flip`` or ``flip_translate``.
    """
    probs = softmax(tta_logits(model, x, batch_size, tta))
    return classification_metrics(y, probs, class_names), probs


def format_table(m):
    """A readable text table of overall and per-class metrics."""
    lines = [f"accuracy {m['accuracy']:.4f}  (n={m['n']})"
             + "".join(f"  top-{k} {v:.4f}" for k, v in m["top_k"].items()),
             f"{'class':>14} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for row in m["per_class"]:
        lines.append(f"{row['class'][:14]:>14} {row['precision']:9.3f} {row['recall']:7.3f} "
                     f"{row['f1']:7.3f} {row['support']:8d}")
    for avg in ("macro", "weighted"):
        a = m[avg]
        lines.append(f"{avg + ' avg':>14} {a['precision']:9.3f} {a['recall']:7.3f} {a['f1']:7.3f} {m['n']:8d}")
    return "\n".join(lines)
