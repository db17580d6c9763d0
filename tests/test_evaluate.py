import json

import numpy as np
import pytest
import yaml
from sklearn import metrics as skm

from keras_transfer.evaluate import classification_metrics, format_table
from keras_transfer.report import aggregate, collect_runs, mean_sd, run_conditions, vs_scratch, write_comparison


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = rng.random((200, 4))
    probs[np.arange(100), y[:100]] += 1.0  # half of them right
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, probs, names, top_k=(1, 2, 5))
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["top_k"] == {"2": pytest.approx(skm.top_k_accuracy_score(y, probs, k=2))}
    p, r, f, s = skm.precision_recall_fscore_support(y, pred)
    for i, row in enumerate(m["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert m["macro"]["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted"]["f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert np.allclose(np.sum(m["confusion_matrix_normalized"], 1), 1, atol=1e-3)
    assert "macro avg" in format_table(m)


def test_figures_are_valid_pngs(tmp_path):
    from PIL import Image

    from keras_transfer import plots

    names = [str(i) for i in range(10)]
    cm = np.eye(10, dtype=int) * 5 + 1
    plots.confusion_matrix_figure(cm, names, str(tmp_path / "cm.png"))
    plots.curves_figure({"full": {"loss": [1, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8],
                                  "val_accuracy": [0.4, 0.7]}}, str(tmp_path / "curves.png"))
    plots.curves_figure({"full": {"loss": [1, 0.5], "accuracy": [0.5, 0.8], "learning_rate": [1e-3, 5e-4]},
                         "cosine": {"loss": [1, 0.6], "accuracy": [0.5, 0.7], "learning_rate": [1e-3, 0.0]}},
                        str(tmp_path / "curves_lr.png"))
    with Image.open(tmp_path / "curves.png") as two, Image.open(tmp_path / "curves_lr.png") as three:
        assert three.size[0] > 1.4 * two.size[0]  # a third panel: the learning rate
    x = np.random.default_rng(0).integers(0, 255, (12, 8, 8, 1), dtype=np.uint8)
    probs = np.random.default_rng(1).random((12, 10))
    plots.misclassified_figure(x, np.zeros(12, int), probs, names, str(tmp_path / "mis.png"))
    plots.comparison_figure([{"label": "a", "accuracy": 0.5, "macro_f1": 0.4, "wall_time": 3, "trainable_params": 10}],
                            str(tmp_path / "cmp.png"))
    for name in ("cm", "curves", "mis", "cmp"):
        with Image.open(tmp_path / f"{name}.png") as im:
            im.verify()
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_compare_mean_and_std():
    rows = [{"strategy": "full", "model": "resnet", "backend": "jax", "accuracy": a, "macro_f1": a - 0.1,
             "wall_time": 10.0, "trainable_params": 5} for a in (0.8, 0.9, 1.0)]
    rows.append({"strategy": "linear", "model": "resnet", "backend": "jax", "accuracy": 0.5, "macro_f1": 0.4,
                 "wall_time": 2.0, "trainable_params": 1})
    agg = {a["strategy"]: a for a in aggregate(rows)}
    assert agg["full"]["n"] == 3
    assert agg["full"]["accuracy"] == pytest.approx(0.9)
    assert agg["full"]["accuracy_std"] == pytest.approx(0.1)  # sample std of 0.8, 0.9, 1.0
    assert agg["linear"]["accuracy_std"] == 0.0


def test_compare_orders_strategies_and_pairs_them_with_scratch():
    """Strategies come in STRATEGIES order, each with its accuracy minus the same run's scratch."""
    accs = {"r0": {"scratch": 0.90, "full": 0.95, "linear": 0.50}, "r1": {"scratch": 0.80, "full": 0.83,
                                                                    "linear": 0.52}}
    rows = [{"run": run, "strategy": s, "model": "m", "backend": "jax", "accuracy": a, "macro_f1": a,
             "wall_time": 1.0, "trainable_params": 1} for run, d in accs.items() for s, a in d.items()]
    rows.append({"run": "r2", "strategy": "full", "model": "m", "backend": "jax", "accuracy": 0.99,
                 "macro_f1": 0.99, "wall_time": 1.0, "trainable_params": 1})  # no scratch: not paired
    agg = aggregate(rows)
    assert [a["strategy"] for a in agg] == ["scratch", "linear", "full"]
    full = agg[2]
    assert full["n"] == 3 and full["vs_scratch_n"] == 2
    assert full["vs_scratch"] == pytest.approx(0.04)  # (0.05 + 0.03) / 2
    assert full["vs_scratch_std"] == pytest.approx(np.std([0.05, 0.03], ddof=1))
    assert agg[1]["vs_scratch"] == pytest.approx((-0.40 - 0.28) / 2)
    assert "vs_scratch" not in agg[0]


def test_compare_groups_runs_by_the_settings_they_differ_in(tmp_path):
    """An ablation (10 vs 100 images per class, two seeds each) gives two conditions of two replicates
    each, named by the one setting that differs; the seed, the data root and the pretrained file do not
    split replicates. Before, every run of a strategy was averaged into one group whatever its setting."""
    accs = {("10", 0): (0.50, 0.60), ("10", 1): (0.54, 0.66), ("100", 0): (0.80, 0.90), ("100", 1): (0.84, 0.92)}
    runs = []
    for (per_class, seed), (scratch, full) in accs.items():
        d = tmp_path / f"pc{per_class}-s{seed}"
        cfg = {"data": {"target": "digits", "per_class": int(per_class), "data_dir": f"/data{seed}"},
               "transfer": {"pretrained": f"/pre/s{seed}/model.keras"}, "seed": seed}
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        for strategy, acc in (("scratch", scratch), ("full", full)):
            (d / "strategies" / strategy).mkdir(parents=True)
            (d / "strategies" / strategy / "metrics.json").write_text(json.dumps(
                {"strategy": strategy, "model": "resnet", "backend": "jax", "accuracy": acc, "macro": {"f1": acc},
                 "wall_time": 1.0, "trainable_params": 10}))
        runs.append(str(d))
    assert set(run_conditions({r: {"seed": i, "data.per_class": 5} for i, r in enumerate(runs)}).values()) == {""}
    assert {r["condition"] for r in collect_runs(runs)} == {"data.per_class=10", "data.per_class=100"}
    agg = write_comparison(runs, str(tmp_path / "cmp"))
    full = {a["condition"]: a for a in agg if a["strategy"] == "full"}
    assert full["data.per_class=10"]["n"] == 2 and full["data.per_class=10"]["accuracy"] == pytest.approx(0.63)
    assert full["data.per_class=100"]["vs_scratch"] == pytest.approx(0.09)
    assert mean_sd(full["data.per_class=10"], "accuracy", ".2f") == "0.63 ± 0.04"
    assert vs_scratch(full["data.per_class=10"]) == "+11.0 ± 1.4 points (n=2)"
    report = open(tmp_path / "cmp" / "report.md").read()
    assert "| data.per_class=100 | full | resnet | jax | 2 | 0.9100 ± 0.0141 | +9.0 ± 1.4 points (n=2) |" in report
    one = write_comparison(runs[:1], str(tmp_path / "one"))  # one run: means, no spread of zero
    assert "| full | resnet | jax | 1 | 0.6000 | +10.0 points (n=1) | 0.6000 | 1.0 | 10 |" in open(
        tmp_path / "one" / "report.md").read()
    assert one[0]["condition"] == ""
