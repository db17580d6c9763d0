"""Main effects of a factorial study's grid keys: for each key, each value against the first, paired on every other
key and the seed (so each difference compares two runs that differ in that key alone), as mean ± sd [95% t
interval] in points of test accuracy, with the mean accuracy, wall time and trainable parameters at each value.

    python experiments/factor_effects.py experiments/results/ablation_resnet_cifar10 [--strategy scratch]
"""

import argparse
import json
import os

import numpy as np
from scipy import stats


def _key(settings, skip):
    return tuple(sorted((k, repr(v)) for k, v in settings.items() if k != skip))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("study_dir")
    p.add_argument("--strategy", default="scratch")
    a = p.parse_args()
    with open(os.path.join(a.study_dir, "study.json")) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["strategy"] == a.strategy and r["kind"] == "deep"]
    keys = list(rows[0]["settings"])
    print("| key | value | runs | accuracy (mean ± sd) | minus the first value, paired (points) | wall time (s) "
          "| trainable params |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for k in keys:
        values = list(dict.fromkeys(repr(r["settings"][k]) for r in rows))
        by = {}
        for r in rows:
            by[(repr(r["settings"][k]), _key(r["settings"], k), r["seed"])] = r
        for i, v in enumerate(values):
            mine = [r for r in rows if repr(r["settings"][k]) == v]
            acc = np.array([r["accuracy"] for r in mine])
            cell = "-"
            if i:
                diffs = np.array([100 * (r["accuracy"] - by[(values[0], _key(r["settings"], k), r["seed"])]["accuracy"])
                                  for r in mine if (values[0], _key(r["settings"], k), r["seed"]) in by])
                half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
                cell = (f"{diffs.mean():+.1f} ± {diffs.std(ddof=1):.1f} [{diffs.mean() - half:+.1f}, "
                        f"{diffs.mean() + half:+.1f}] (n={len(diffs)})")
            wall = np.mean([r["wall_time"] for r in mine])
            params = sorted({r["trainable_params"] for r in mine})
            shown = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,} .. {params[-1]:,}"
            print(f"| {k} | {v} | {len(mine)} | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} | {cell} | {wall:.1f} | "
                  f"{shown} |")


if __name__ == "__main__":
    main()
