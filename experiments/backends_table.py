"""Per-backend means of one study run on several backends, and whether they agree within their standard errors.

    python experiments/backends_table.py runs/main_job_jax runs/main_job_tensorflow runs/main_job_torch

Prints a markdown table: per condition and strategy, mean ± sd over seeds on each backend, then "agree" when every
pair of backend means differs by less than two standard errors of that difference (sqrt(se_a^2 + se_b^2), se = sd /
sqrt(n)), else the largest gap and its two standard errors.
"""

import json
import math
import os
import sys


def load(study_dir):
    with open(os.path.join(study_dir, "study.json")) as f:
        data = json.load(f)
    return data, {(g["condition"], g["strategy"]): g for g in data["groups"]}


def backend_of(data, study_dir):
    for run in data["runs"]:
        if run["state"] == "finished":
            summary = os.path.join(run["dir"], "summary.json")
            if os.path.exists(summary):
                with open(summary) as f:
                    return json.load(f).get("backend", study_dir)
    return study_dir


def main(dirs):
    studies = []
    for d in dirs:
        data, groups = load(d)
        studies.append((backend_of(data, d), groups))
    keys = list(studies[0][1])
    names = [b for b, _ in studies]
    print("| condition | strategy | " + " | ".join(names) + " | agree? |")
    print("|---|---|" + "---:|" * len(names) + "---|")
    for key in keys:
        cells, stats = [], []
        for _, groups in studies:
            g = groups.get(key)
            if g is None or g["accuracy"]["mean"] is None:
                cells.append("-")
                continue
            a = g["accuracy"]
            sd = a["sd"] or 0.0
            cells.append(f"{a['mean']:.3f} ± {sd:.3f}")
            stats.append((a["mean"], sd / math.sqrt(max(a["n"], 1))))
        worst = None
        for i in range(len(stats)):
            for j in range(i + 1, len(stats)):
                gap = abs(stats[i][0] - stats[j][0])
                two_se = 2 * math.sqrt(stats[i][1] ** 2 + stats[j][1] ** 2)
                if gap >= two_se and (worst is None or gap - two_se > worst[0] - worst[1]):
                    worst = (gap, two_se)
        verdict = "yes" if worst is None else f"**no** ({worst[0] * 100:.1f} points apart, 2 s.e. {worst[1] * 100:.1f})"
        condition, strategy = key
        print(f"| {condition or '(base)'} | {strategy} | " + " | ".join(cells) + f" | {verdict} |")


if __name__ == "__main__":
    main(sys.argv[1:])
