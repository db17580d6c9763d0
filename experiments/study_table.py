"""A compact markdown table of a study: one row per condition, one column per strategy (mean ± sd over seeds), the
raw-pixel baselines, and the best deep strategy minus the best baseline, paired by seed, with its 95% interval.

    python experiments/study_table.py experiments/results/main_job_recipe2 [--strategies scratch,linear,full]
"""

import argparse
import json
import os


def main():
    p = argparse.ArgumentParser()
    p.add_argument("study_dir")
    p.add_argument("--strategies", help="comma list (default: every deep strategy of the study)")
    a = p.parse_args()
    with open(os.path.join(a.study_dir, "study.json")) as f:
        data = json.load(f)
    groups = data["groups"]
    conditions = list(dict.fromkeys(g["condition"] for g in groups))
    deep = list(dict.fromkeys(g["strategy"] for g in groups if g["kind"] == "deep"))
    base = list(dict.fromkeys(g["strategy"] for g in groups if g["kind"] == "baseline"))
    deep = a.strategies.split(",") if a.strategies else deep
    print("| condition | " + " | ".join(deep + [f"{b} (px)" for b in base]) + " | best deep − best baseline (paired) |")
    print("|---|" + "---:|" * (len(deep) + len(base)) + "---:|")
    for c in conditions:
        by = {g["strategy"]: g for g in groups if g["condition"] == c}
        best = max((s for s in deep if s in by), key=lambda s: by[s]["accuracy"]["mean"])
        best_b = max(base, key=lambda b: by[b]["accuracy"]["mean"]) if base else None
        cells = []
        for s in deep + base:
            acc = by[s]["accuracy"] if s in by else None
            text = "-" if acc is None else f"{acc['mean']:.3f} ± {acc['sd'] or 0:.3f}"
            cells.append(f"**{text}**" if s == best else text)
        diff = "-"
        if best_b and (by[best].get("vs_baseline") or {}).get(best_b):
            d = by[best]["vs_baseline"][best_b]
            lo, hi = d["mean"] - (d["ci95"] or 0), d["mean"] + (d["ci95"] or 0)
            diff = (f"{best} − {best_b}: {d['mean'] * 100:+.1f} ± {(d['sd'] or 0) * 100:.1f} "
                    f"[{lo * 100:+.1f}, {hi * 100:+.1f}]")
        print(f"| {c or '(base)'} | " + " | ".join(cells) + f" | {diff} |")


if __name__ == "__main__":
    main()
