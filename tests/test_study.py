"""ktransfer study: grid, seeds, run directories, resume, fault containment, validation, executors."""

import json
import os

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from keras_transfer.cli import main

TINY = {"model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "data": {"batch_size": 32, "per_class": 3, "augment": "none"}}


# The study's own logic (grid, listed conditions, the report read back from the runs, fault containment, validation
# of a changed file) does not depend on the backend; each backend runs a whole study in the interrupted-study test
# below (training, resume, report), and its runs' training in test_cli / test_train. These tests run once, on JAX
# (CI's tox runs every backend).
study_logic_only = pytest.mark.skipif(keras.config.backend() != "jax",
                                      reason="the study's orchestration is backend-independent: tested on JAX")


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def write_study(tmp_path, digits_npz, file="s", **extra):
    doc = {**TINY, "data": {**TINY["data"], "source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}"},
           "strategies": ["scratch", "partial"], "seeds": [0, 1],
           "grid": {"transfer.train_last_k": [0, 2]}, **extra}
    path = tmp_path / f"{file}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def read(path):
    with open(path) as f:
        return json.load(f)


def assert_same_groups(a, b, metrics=("accuracy", "macro_f1", "trainable_params")):
    """The same conditions and strategies, with the same mean metrics and paired differences."""
    assert [(g["condition"], g["strategy"], g["n"]) for g in a] == [(g["condition"], g["strategy"], g["n"]) for g in b]
    for ga, gb in zip(a, b):
        for m in metrics + ("vs_scratch", "vs_reference"):
            if ga.get(m) is None:
                assert gb.get(m) is None
            elif ga[m]["mean"] is not None:
                assert gb[m]["mean"] == pytest.approx(ga[m]["mean"], abs=1e-6), (ga["condition"], ga["strategy"], m)


@study_logic_only
def test_a_tiny_study_writes_ordinary_runs_and_a_report_read_back_from_them(tmp_path, digits_npz):
    study, out = write_study(tmp_path, digits_npz), str(tmp_path / "out")
    r = invoke("study", study, "--dry-run", "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 condition(s) x 2 seed(s) = 4 run(s)" in r.output and "train_last_k-0_seed-1" in r.output
    assert not os.path.exists(out)  # a dry run writes nothing

    r = invoke("study", study, "--out", out)
    assert r.exit_code == 0, r.output
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert runs == ["train_last_k-0_seed-0", "train_last_k-0_seed-1", "train_last_k-2_seed-0", "train_last_k-2_seed-1"]
    assert sorted(os.listdir(os.path.join(out, "pretrain"))) == ["seed-0", "seed-1"]  # one pretraining per seed
    for f in ("study.md", "study.html", "study.json", "study.yaml", "study_bars.png",
              "study_transfer_train_last_k.png"):
        assert os.path.exists(os.path.join(out, f)), f
    report = read(os.path.join(out, "study.json"))
    assert report["finished"] == report["total"] == 4
    # Every number of the report equals the one read back from the runs' own metrics.json.
    for g in report["groups"]:
        if g["kind"] != "deep":
            continue
        k = g["settings"]["transfer.train_last_k"]
        accs = [read(os.path.join(out, "runs", f"train_last_k-{k}_seed-{s}", "strategies", g["strategy"],
                                  "metrics.json"))["accuracy"] for s in (0, 1)]
        assert g["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert g["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
        assert g["accuracy"]["ci95"] == pytest.approx(12.706 * np.std(accs, ddof=1) / np.sqrt(2), rel=1e-3)
    # Paired differences: partial minus the same run's scratch; train_last_k=2 minus the reference (0).
    def summary(k, seed):
        return read(os.path.join(out, "runs", f"train_last_k-{k}_seed-{seed}", "summary.json"))["strategies"]

    runs_, runs1 = {k: summary(k, 0) for k in (0, 2)}, {k: summary(k, 1) for k in (0, 2)}
    (g2,) = [g for g in report["groups"] if g["condition"] == "transfer.train_last_k=2" and g["strategy"] == "partial"]
    assert g2["vs_scratch"]["mean"] == pytest.approx(np.mean(
        [r[2]["partial"]["accuracy"] - r[2]["scratch"]["accuracy"] for r in (runs_, runs1)]))
    assert g2["vs_reference"]["mean"] == pytest.approx(np.mean(
        [r[2]["partial"]["accuracy"] - r[0]["partial"]["accuracy"] for r in (runs_, runs1)]))
    # Trainable parameters follow the freezing depth; peak memory is recorded per strategy.
    p0 = read(os.path.join(out, "runs", "train_last_k-0_seed-0", "strategies", "partial", "metrics.json"))
    p2 = read(os.path.join(out, "runs", "train_last_k-2_seed-0", "strategies", "partial", "metrics.json"))
    assert p0["trainable_params"] < p2["trainable_params"]
    assert p0["peak_host_mb"] > 50
    # The classical baselines are reference rows of every run and of the study.
    assert {g["strategy"] for g in report["groups"] if g["kind"] == "baseline"} == {"logreg", "knn"}
    assert "raw pixels" in open(os.path.join(out, "study.md")).read()
    # Per class: each class's F1 is the mean over seeds of the runs' own, the confusion matrix their sum.
    pc = report["per_class"]["transfer.train_last_k=2"]["partial"]
    f1s = [[c["f1"] for c in read(os.path.join(out, "runs", f"train_last_k-2_seed-{s}", "strategies", "partial",
                                               "metrics.json"))["per_class"]] for s in (0, 1)]
    np.testing.assert_allclose(pc["f1"], np.mean(f1s, 0))
    assert np.sum(pc["confusion"]) == 2 * p2["n"] and pc["n"] == 2
    md = open(os.path.join(out, "study.md")).read()
    assert "## Per class" in md and "Hardest class for" in md
    assert os.path.exists(os.path.join(out, "study_confusion_0.png")) and "study_confusion_1.png" in md
    # A run of the study is an ordinary run directory.
    r = invoke("evaluate", os.path.join(out, "runs", "train_last_k-2_seed-0"), "--out", str(tmp_path / "ev"))
    assert r.exit_code == 0, r.output
    # Re-running a finished study trains nothing and writes the same report.
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 0 and "[1/" not in r.output, r.output
    assert read(os.path.join(out, "study.json"))["groups"] == report["groups"]


@study_logic_only
def test_a_scratch_only_study_pretrains_nothing_and_sweeps_the_architecture(tmp_path, digits_npz):
    """An ablation sweep: only `scratch`, so no run pretrains; architecture keys change the parameter counts."""
    study = write_study(tmp_path, digits_npz, strategies=["scratch"], seeds=[0],
                        grid={"model.batch_norm": [True, False], "model.pooling": ["avg", "flatten"]})
    out = str(tmp_path / "out")
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 0, r.output
    assert not os.path.exists(os.path.join(out, "pretrain"))
    runs = os.listdir(os.path.join(out, "runs"))
    assert len(runs) == 4 and not any(os.path.exists(os.path.join(out, "runs", d, "pretrain")) for d in runs)
    groups = {g["condition"]: g for g in read(os.path.join(out, "study.json"))["groups"] if g["kind"] == "deep"}
    params = {c: g["trainable_params"]["mean"] for c, g in groups.items()}
    assert params["model.batch_norm=False, model.pooling=avg"] < params["model.batch_norm=True, model.pooling=avg"]
    assert params["model.batch_norm=True, model.pooling=avg"] < params["model.batch_norm=True, model.pooling=flatten"]
    summary = read(os.path.join(out, "runs", runs[0], "summary.json"))
    assert summary["source"] == "none (scratch only)" and "does not measure transfer" in summary["verdict"]


@study_logic_only
def test_listed_conditions_cross_the_grid_and_are_compared_with_the_listed_reference(tmp_path, digits_npz):
    """Keys that go together (a model and its widths) are listed one by one; each is crossed with the grid, and the
    paired differences go to the listed reference with the same grid values."""
    study = write_study(tmp_path, digits_npz, strategies=["scratch", "linear"], seeds=[0],
                        conditions=[{"model.widths": [4, 8, 8]},
                                    {"model.widths": [8, 8, 16], "model.head_hidden": 0}],
                        grid={"data.per_class": [3, 4]},
                        reference={"model.widths": [4, 8, 8]})
    out = str(tmp_path / "out")
    r = invoke("study", study, "--dry-run", "--out", out)
    assert r.exit_code == 0, r.output
    assert "4 condition(s) x 1 seed(s) = 4 run(s)" in r.output and "2 shared pretrain run(s)" in r.output, r.output
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 0, r.output
    report = read(os.path.join(out, "study.json"))
    assert report["finished"] == report["total"] == 4
    deep = {(g["condition"], g["strategy"]): g for g in report["groups"] if g["kind"] == "deep"}
    # (write_study sorts each mapping's keys: head_hidden before widths)
    small, big = "model.widths=4-8-8, data.per_class=4", "model.head_hidden=0, model.widths=8-8-16, data.per_class=4"
    assert deep[(big, "linear")]["reference"] == small and "vs_reference" not in deep[(small, "linear")]
    def acc(cond, seed):
        return read(os.path.join(out, "runs", f"{cond}_seed-{seed}", "strategies", "linear", "metrics.json"))
    names = {small: "widths-4-8-8_per_class-4", big: "head_hidden-0_widths-8-8-16_per_class-4"}
    assert deep[(big, "linear")]["vs_reference"]["mean"] == pytest.approx(np.mean(
        [acc(names[big], s)["accuracy"] - acc(names[small], s)["accuracy"] for s in (0,)]))
    assert acc(names[big], 0)["trainable_params"] != acc(names[small], 0)["trainable_params"]
    assert "Conditions listed: model.widths=4-8-8; model.head_hidden=0, model.widths=8-8-16, each crossed with the " \
           "grid" in open(os.path.join(out, "study.md")).read()


def test_an_interrupted_study_resumes_to_the_report_of_an_uninterrupted_one(tmp_path, digits_npz, monkeypatch):
    study = write_study(tmp_path, digits_npz, seeds=[0], grid={"transfer.train_last_k": [2]},
                        finetune={"epochs": 2})
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert invoke("study", study, "--out", whole).exit_code == 0

    from keras_transfer import runner

    real_fit, calls = runner.fit, []

    def fit_then_die(model, train, val, cfg, stage_dir, initial_epoch=0, epochs=None, **kw):
        calls.append(stage_dir)
        if len(calls) == 3:  # pretrain, scratch, then partial: one epoch (checkpointed), then killed
            real_fit(model, train, val, cfg, stage_dir, initial_epoch=initial_epoch, epochs=initial_epoch + 1, **kw)
            raise KeyboardInterrupt
        return real_fit(model, train, val, cfg, stage_dir, initial_epoch=initial_epoch, epochs=epochs, **kw)

    monkeypatch.setattr(runner, "fit", fit_then_die)
    r = invoke("study", study, "--out", cut)
    assert r.exit_code != 0
    monkeypatch.setattr(runner, "fit", real_fit)
    killed = os.path.join(cut, "runs", "train_last_k-2_seed-0")
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    assert os.path.exists(os.path.join(killed, "strategies", "partial", "checkpoints", "last.keras"))

    r = invoke("study", study, "--dry-run", "--out", cut)
    assert "[partial]" in r.output and "pretrain seed-0: " in r.output and "[finished]" in r.output, r.output
    r = invoke("study", study, "--out", cut)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    history = open(os.path.join(killed, "strategies", "partial", "history.csv")).read().splitlines()
    assert len(history) == 3  # header + 2 epochs, the second one trained after the resume
    # The resumed epoch trains as the uninterrupted one did: same losses and accuracies (frozen blocks, their
    # BatchNorm and dropout included), epoch times aside.
    import csv

    def curves(root):
        with open(os.path.join(root, "runs", "train_last_k-2_seed-0", "strategies", "partial", "history.csv")) as f:
            return [{k: float(v) for k, v in row.items() if k != "epoch_time"} for row in csv.DictReader(f)]

    for a, b in zip(curves(whole), curves(cut)):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert_same_groups(read(os.path.join(whole, "study.json"))["groups"],
                       read(os.path.join(cut, "study.json"))["groups"])


@study_logic_only
def test_a_failing_condition_is_recorded_and_the_others_go_on(tmp_path, digits_npz):
    missing = str(tmp_path / "missing.npz")
    study = write_study(tmp_path, digits_npz, seeds=[0], strategies=["linear"],
                        grid={"data.target": [f"npz:{digits_npz}", f"npz:{missing}"]})
    out = str(tmp_path / "out")
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 1, r.output
    report = read(os.path.join(out, "study.json"))
    states = {x["name"]: (x["state"], x["error"]) for x in report["runs"]}
    assert states["target-digits.npz_seed-0"] == ("finished", None)
    state, error = states["target-missing.npz_seed-0"]
    assert state == "failed" and "missing.npz" in error and "\n" not in error
    md = open(os.path.join(out, "study.md")).read()
    assert "## Failed runs" in md and "missing.npz" in md


@study_logic_only
def test_a_failed_shared_pretraining_fails_the_runs_that_need_it_only(tmp_path, digits_npz):
    missing = str(tmp_path / "gone" / "x.npz")
    study = write_study(tmp_path, digits_npz, seeds=[0], strategies=["linear"],
                        grid={"data.source": [f"npz:{digits_npz}", f"npz:{missing}"]})
    out = str(tmp_path / "out")
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 1, r.output
    runs = {x["name"]: x for x in read(os.path.join(out, "study.json"))["runs"]}
    assert runs["source-digits.npz_seed-0"]["state"] == "finished"
    failed = runs["source-x.npz_seed-0"]
    assert failed["state"] == "failed" and failed["error"].startswith("pretraining source-x.npz_seed-0 failed: ")
    assert "x.npz" in open(os.path.join(out, "pretrain", "source-x.npz_seed-0", "error.txt")).readline()


def test_dry_run_names_runs_apart_and_takes_null_values(tmp_path, digits_npz):
    other = tmp_path / "other"
    other.mkdir()
    twin = other / "digits.npz"  # the same file name in another folder: the run names must still differ
    twin.write_bytes(open(digits_npz, "rb").read())
    study = write_study(tmp_path, digits_npz, strategies=["linear"], seeds=[0],
                        grid={"data.target": [f"npz:{digits_npz}", f"npz:{twin}"], "data.per_class": [3, None]})
    r = invoke("study", study, "--dry-run", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    names = [line.split(":")[0].split()[-1] for line in r.output.splitlines() if line.startswith("  run ")]
    assert len(names) == len(set(names)) == 4, names
    assert sum("all per class" in line for line in r.output.splitlines()) == 2  # null: every training image
    assert sum("3 per class" in line for line in r.output.splitlines()) == 2


def test_with_a_pretrained_model_only_keys_fine_tuning_reads_may_vary(tmp_path, digits_npz):
    pre = str(tmp_path / "pre")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "source": f"npz:{digits_npz}",
                                                     "target": f"npz:{digits_npz}"}}))
    assert invoke("pretrain", "--config", str(tiny), "--out", pre).exit_code == 0
    bad = write_study(tmp_path, digits_npz, file="bad", pretrained=pre, grid={"pretrain.epochs": [1, 2]})
    r = invoke("study", bad, "--dry-run")
    assert r.exit_code == 2 and "grid: pretrain.epochs: has no effect when every run fine-tunes" in r.output, r.output
    ok = write_study(tmp_path, digits_npz, file="ok", pretrained=pre,
                     grid={"model.head_hidden": [0, 8], "data.augment": ["none", "mild"]})
    r = invoke("study", ok, "--dry-run", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0 and "0 shared pretrain run(s)" in r.output, r.output


def test_a_second_study_on_the_same_directory_is_refused_while_the_first_runs(tmp_path, digits_npz):
    import subprocess
    import sys

    from keras_transfer.study_run import lock

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(Exception, match=f"in use by another ktransfer study \\(process {sleeper.pid}\\)"):
            with lock(str(out)):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with lock(str(out)):  # the lock of a process that died is taken over
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("change, expected", [
    ({"grid": {"data.per_clas": [3]}}, "data.per_clas"),
    ({"grid": {"seed": [0, 1]}}, "seeds:"),
    ({"grid": {"data.per_class": [0]}}, "data.per_class"),
    ({"grid": {"data.per_class": 5}}, "data.per_class: expected a non-empty list"),
    ({"grid": {"model.pooling": ["avg", "max"]}}, "model.pooling"),
    ({"grid": {"model.batch_norm": ["yes"]}}, "model.batch_norm"),
    ({"grid": {"transfer.train_last_k": [0, 9]}}, "train_last_k"),
    ({"grid": {"model.widths": ["64,128"]}}, "model.widths"),
    ({"seeds": [0, "a"]}, "seeds"),
    ({"strategies": ["linear", "fancy"]}, "fancy"),
    ({"reference": {"transfer.train_last_k": 7}}, "reference"),
    ({"epochs": 3}, "unknown keys"),
    ({"grid": {"data.per_class": [3, 3]}}, "data.per_class: expected distinct values"),
    ({"grid": {"finetune.ema_momentum": ["x"]}}, "finetune.ema_momentum"),
    ({"grid": {"data.augment": ["mild", "heavy"]}}, "data.augment"),
    ({"grid": {"finetune.jit_compile": ["sometimes"]}}, "jit_compile"),
    ({"name": "../escape"}, "name: expected letters"),
    ({"conditions": {"model.widths": [4, 8, 8]}}, "conditions: expected a non-empty list of mappings"),
    ({"conditions": [{"transfer.train_last_k": 0}]}, "conditions[0]: transfer.train_last_k: is also a grid key"),
    ({"conditions": [{"model.widths": [4, 8, 8]}, {"model.widths": [4, 8, 8]}]}, "expected distinct conditions"),
    ({"conditions": [{"model.pooling": "max"}]}, "conditions[0]: model.pooling"),
    ({"conditions": [{"model.widhts": [4]}]}, "model.widhts"),
    ({"conditions": [{"model.widths": [4, 8, 8]}, {"model.batch_norm": False}],
      "reference": {"model.widths": [4, 8, 8], "model.batch_norm": False}}, "which no condition has together"),
])
def test_an_invalid_study_is_refused_in_one_line_before_anything_runs(tmp_path, digits_npz, change, expected):
    study, out = write_study(tmp_path, digits_npz, **change), str(tmp_path / "out")
    r = invoke("study", study, "--out", out)
    assert r.exit_code == 2, r.output
    assert expected in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not os.path.exists(out)


@study_logic_only
def test_a_changed_study_file_is_refused_but_more_seeds_are_added(tmp_path, digits_npz):
    out = str(tmp_path / "out")
    study = write_study(tmp_path, digits_npz, seeds=[0], strategies=["linear"], grid={})
    assert invoke("study", study, "--out", out).exit_code == 0
    changed = write_study(tmp_path, digits_npz, file="s2", seeds=[0], strategies=["linear"], grid={},
                          finetune={"epochs": 3})
    r = invoke("study", changed, "--out", out)
    assert r.exit_code == 2 and "finetune.epochs: 1 -> 3" in r.output, r.output
    more = write_study(tmp_path, digits_npz, file="s3", seeds=[0, 1], strategies=["linear"], grid={})
    r = invoke("study", more, "--dry-run", "--out", out)
    assert r.exit_code == 0 and "seed-0: (base), seed 0" in r.output and "[finished]" in r.output, r.output
    assert "2 of 4 run directories to do" in r.output  # seed 1: its pretraining and its run
    # An existing directory that is not a study is not taken over.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = invoke("study", study, "--out", str(other))
    assert r.exit_code == 2 and "holds no study" in r.output
    assert os.listdir(other) == ["keep.txt"]


def test_the_ray_executor_runs_the_study_as_ray_tasks(tmp_path, digits_npz):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    study = write_study(tmp_path, digits_npz, seeds=[0], strategies=["linear"], grid={})
    out = str(tmp_path / "ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local instance, 2 CPUs
    try:
        r = invoke("study", study, "--out", out, "--executor", "ray")
    finally:
        ray.shutdown()
    assert r.exit_code == 0, r.output
    assert "ray: 1 pretrain task(s) submitted" in r.output and "ray: 1 run task(s) submitted" in r.output
    report = read(os.path.join(out, "study.json"))
    assert report["finished"] == 1
    (g,) = [g for g in report["groups"] if g["strategy"] == "linear"]
    metrics = read(os.path.join(out, "runs", "seed-0", "strategies", "linear", "metrics.json"))
    assert g["accuracy"]["mean"] == metrics["accuracy"] and metrics["backend"] == os.environ.get("KERAS_BACKEND")
