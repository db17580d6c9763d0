"""The bad-input contract of the CLI, as a table: every case is one line saying what was expected and what was
received, exit status 2, no traceback, and the working tree byte-for-byte as it was (no new directory, no file
changed or moved). Validation-time failures only: nothing here trains."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from keras_transfer.cli import main

TINY = {"model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "data": {"batch_size": 32, "per_class": 3, "augment": "none"},
        "transfer": {"strategies": ["linear"], "baselines": []}}


def _npz(path, x, y, names=None):
    extra = {} if names is None else {"class_names": np.array(names)}
    np.savez(path, x=x, y=y, **extra)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a finished tiny run, existing outputs, bad data and bad config files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("ws")
    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    _npz(root / "good.npz", x[:300], d.target[:300])
    _npz(root / "negative.npz", x[:50], np.where(np.arange(50) == 3, -1, d.target[:50]))
    _npz(root / "out_of_range.npz", x[:50], d.target[:50], names=[str(i) for i in range(5)])
    _npz(root / "empty.npz", x[:0], d.target[:0])
    _npz(root / "one_class.npz", x[:50], np.zeros(50, int), names=["zero"])
    _npz(root / "float_labels.npz", x[:50], d.target[:50].astype("float32") + 0.5)
    _npz(root / "four_channels.npz", np.repeat(x[:50], 4, axis=-1), d.target[:50])
    for name, classes in (("one_class_folder", {"a": 4}), ("empty_class_folder", {"a": 4, "b": 0, "c": 4})):
        for c, n in classes.items():
            os.makedirs(root / name / c)
            for i in range(n):
                Image.fromarray(x[i, ..., 0]).save(root / name / c / f"{i}.png")
    cfg = dict(TINY, data={**TINY["data"], "source": f"npz:{root / 'good.npz'}",
                           "target": f"npz:{root / 'good.npz'}"})
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    for name, doc in (("seed_text.yaml", {"seed": "abc"}), ("seed_list.yaml", {"seed": [1, 2]}),
                      ("widths_text.yaml", {"model": {"widths": "64,128"}}), ("section_list.yaml", {"data": [1]}),
                      ("unknown_key.yaml", {"data": {"sauce": 1}}), ("unknown_section.yaml", {"dataa": {}}),
                      ("lr_text.yaml", {"finetune": {"learning_rate": "fast"}}),
                      ("bn_text.yaml", {"model": {"batch_norm": "yes"}}),
                      ("strategies_text.yaml", {"transfer": {"strategies": "full"}}),
                      ("epochs_float.yaml", {"pretrain": {"epochs": 2.5}})):
        (root / name).write_text(yaml.safe_dump(doc))
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "not_a_mapping.yaml").write_text("- a\n- b\n")
    (root / "a_file.txt").write_text("keep me\n")
    os.makedirs(root / "full_dir")
    (root / "full_dir" / "result.txt").write_text("an earlier result\n")
    Image.fromarray(x[0, ..., 0]).save(root / "img.png")
    r = CliRunner().invoke(main, ["finetune", "--config", str(root / "tiny.yaml"), "--out", str(root / "run"),
                                  "--no-preview"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (root / "gradcam.png").write_bytes(b"an earlier figure")
    (root / "preds.csv").write_text("an earlier prediction\n")
    shutil.copytree(root / "run", root / "corrupt_run")
    (root / "corrupt_run" / "strategies" / "linear" / "metrics.json").write_text("{not json")
    os.makedirs(root / "study_dir")
    (root / "study.yaml").write_text(yaml.safe_dump({"base": str(root / "tiny.yaml"), "seeds": [0],
                                                     "grid": {"data.per_class": [2, 2]}}))
    return root


def snapshot(root):
    out = {}
    for d, _dirs, files in os.walk(root):
        out[os.path.relpath(d, root)] = "dir"
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha1(fh.read()).hexdigest())
    return out


# (command line with {ws} for the workspace, a fragment the one line must contain)
CASES = [
    # option values that pass a type check but not the code
    ("finetune --config {ws}/tiny.yaml --lr inf", "Received: inf"),
    ("finetune --config {ws}/tiny.yaml --lr nan", "Received: nan"),
    ("finetune --config {ws}/tiny.yaml --lr -1", "Received: -1"),
    ("finetune --config {ws}/tiny.yaml --lr 0", "learning rate > 0"),
    ("finetune --config {ws}/tiny.yaml --lr abc", "'abc' is not a valid float"),
    ("finetune --config {ws}/tiny.yaml --backbone-lr inf", "Received: inf"),
    ("finetune --config {ws}/tiny.yaml --backbone-lr 0", "multiplier > 0"),
    ("finetune --config {ws}/tiny.yaml --layer-decay 2", "(0, 1]"),
    ("finetune --config {ws}/tiny.yaml --seed -1", "seed"),
    ("finetune --config {ws}/tiny.yaml --devices 0", "--devices: expected a number of devices >= 1 or 'all'"),
    ("finetune --config {ws}/tiny.yaml --devices two", "Received: 'two'"),
    ("pretrain --config {ws}/tiny.yaml --devices 4096", "--devices 4096: "),  # JAX: too many; TF, torch: not JAX
    ("study {ws}/tiny.yaml --devices -2", "--devices: expected"),
    ("finetune --config {ws}/tiny.yaml --seed 99999999999999999999", "2**32"),
    ("finetune --config {ws}/tiny.yaml --width 16,abc", "--width"),
    ("finetune --config {ws}/tiny.yaml --width 0,0,0", "widths"),
    ("finetune --config {ws}/tiny.yaml --batch-size 0", "batch_size"),
    ("finetune --config {ws}/tiny.yaml --per-class 0", "per_class"),
    ("finetune --config {ws}/tiny.yaml --per-class -3", "per_class"),
    ("finetune --config {ws}/tiny.yaml --fraction 1.5", "fraction"),
    ("finetune --config {ws}/tiny.yaml --finetune-epochs 0", "epochs"),
    ("finetune --config {ws}/tiny.yaml --pretrain-epochs -1", "epochs"),
    ("finetune --config {ws}/tiny.yaml --dropout 1.5", "dropout"),
    ("finetune --config {ws}/tiny.yaml --head-dropout -0.1", "head_dropout"),
    ("finetune --config {ws}/tiny.yaml --head-hidden -1", "head_hidden"),
    ("finetune --config {ws}/tiny.yaml --input-size 0", "input_size"),
    ("finetune --config {ws}/tiny.yaml --channels 2", "2"),
    ("finetune --config {ws}/tiny.yaml --train-last-k 9", "train_last_k"),
    ("finetune --config {ws}/tiny.yaml --freeze-until nowhere", "freeze_until"),
    ("finetune --config {ws}/tiny.yaml --lp-epochs 0", "lp_epochs"),
    ("finetune --config {ws}/tiny.yaml --l2sp-alpha -1", "l2sp_alpha"),
    ("finetune --config {ws}/tiny.yaml --l2sp-beta inf", "l2sp_beta"),
    ("finetune --config {ws}/tiny.yaml --bss-eta nan", "bss_eta"),
    ("finetune --config {ws}/tiny.yaml --surgical-block top", "surgical_block"),
    ("finetune --config {ws}/tiny.yaml --strategies full,nope", "nope"),
    ("finetune --config {ws}/tiny.yaml --model nope", "nope"),
    ("finetune --config {ws}/tiny.yaml --target nope", "nope"),
    ("finetune --config {ws}/tiny.yaml --source nope", "nope"),
    ("finetune --config {ws}/tiny.yaml --augment wild", "wild"),
    ("finetune --config {ws}/tiny.yaml --optimizer rmsprop", "rmsprop"),
    ("finetune --config {ws}/tiny.yaml --tta nope", "nope"),
    ("finetune --config {ws}/tiny.yaml --steps-per-execution 0", "steps_per_execution"),
    ("finetune --config {ws}/tiny.yaml --bogus", "No such option"),
    ("finetune --config {ws}/tiny.yaml --source imagenet --weights x.h5", "--source imagenet"),
    ("finetune --config {ws}/tiny.yaml --weights {ws}/missing.weights.h5", "missing.weights.h5"),
    ("finetune --config {ws}/tiny.yaml --pretrained {ws}/a_file.txt", "a_file.txt"),
    ("finetune --config {ws}/tiny.yaml --pretrained {ws}/nothing_here", "nothing_here"),
    # configuration files
    ("finetune --config {ws}/missing.yaml", "missing.yaml"),
    ("finetune --config {ws}/full_dir", "full_dir"),
    ("finetune --config {ws}/binary.yaml", "binary.yaml"),
    ("finetune --config {ws}/not_a_mapping.yaml", "mapping"),
    ("finetune --config {ws}/seed_text.yaml", "seed"),
    ("finetune --config {ws}/seed_list.yaml", "seed"),
    ("finetune --config {ws}/widths_text.yaml", "widths"),
    ("finetune --config {ws}/section_list.yaml", "[data]"),
    ("finetune --config {ws}/unknown_key.yaml", "sauce"),
    ("finetune --config {ws}/unknown_section.yaml", "dataa"),
    ("finetune --config {ws}/lr_text.yaml", "learning_rate"),
    ("finetune --config {ws}/bn_text.yaml", "batch_norm"),
    ("finetune --config {ws}/strategies_text.yaml", "strategies"),
    ("pretrain --config {ws}/epochs_float.yaml", "epochs"),
    # data that would train on garbage
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/negative.npz", "labels in 0..9"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/out_of_range.npz", "labels in 0..4"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/empty.npz", "empty"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/one_class.npz", "at least 2 classes"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/float_labels.npz", "integer class labels"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/four_channels.npz", "1 or 3"),
    ("finetune --config {ws}/tiny.yaml --target npz:{ws}/a_file.txt", "a_file.txt"),
    ("finetune --config {ws}/tiny.yaml --target folder:{ws}/one_class_folder", "at least 2 classes"),
    ("finetune --config {ws}/tiny.yaml --target folder:{ws}/empty_class_folder", "'b' has none"),
    ("finetune --config {ws}/tiny.yaml --target folder:{ws}/nowhere", "nowhere"),
    ("pretrain --config {ws}/tiny.yaml --source npz:{ws}/negative.npz", "labels in 0..9"),
    # output paths: existing results, files for folders and the reverse, places that cannot be written
    ("finetune --config {ws}/tiny.yaml --out {ws}/full_dir", "not empty"),
    ("finetune --config {ws}/tiny.yaml --out {ws}/a_file.txt", "is a file"),
    ("finetune --config {ws}/tiny.yaml --out {ws}/a_file.txt/below", "below the file"),
    ("finetune --config {ws}/tiny.yaml --out /proc/ktransfer-x", "cannot be written"),
    ("pretrain --config {ws}/tiny.yaml --out {ws}/full_dir", "not empty"),
    ("evaluate {ws}/run --out {ws}/full_dir", "not empty"),
    ("evaluate {ws}/run --out {ws}/a_file.txt", "is a file"),
    ("evaluate {ws}/run --out /proc/ktransfer-x", "cannot be written"),
    ("evaluate {ws}/run --out {ws}/a_file.txt/below", "below the file"),
    ("evaluate {ws}/nothing_here", "nothing_here"),
    ("gradcam {ws}/run --out {ws}/gradcam.png", "exists: expected a new file"),
    ("gradcam {ws}/run --out {ws}/full_dir", "is a directory"),
    ("gradcam {ws}/run --out /proc/ktransfer-x.png", "cannot be written"),
    ("gradcam {ws}/run --strategies linear --out {ws}/gradcam.png", "exists: expected a new file"),
    ("gradcam {ws}/run --strategies linear,full", "full"),
    ("predict {ws}/run {ws}/img.png --out {ws}/preds.csv", "exists: expected a new file"),
    ("predict {ws}/run {ws}/img.png --out /proc/ktransfer-x.csv", "cannot be written"),
    ("predict {ws}/run {ws}/img.png --out {ws}/a_file.txt/p.csv", "below the file"),
    ("predict {ws}/run {ws}/nothing.png", "nothing.png"),
    ("predict {ws}/run {ws}/img.png --top-k 0", "--top-k"),
    ("compare {ws}/run --out {ws}/full_dir", "not empty"),
    ("compare {ws}/run --out {ws}/a_file.txt", "is a file"),
    ("compare {ws}/corrupt_run --out {ws}/new_compare", "corrupt_run"),
    ("compare {ws}/nothing_here", "nothing_here"),
    ("study {ws}/study.yaml --out {ws}/study_out", "distinct values"),
    ("study {ws}/missing.yaml", "missing.yaml"),
]


@pytest.mark.parametrize("line,fragment", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(ws, line, fragment, monkeypatch):
    monkeypatch.chdir(ws)  # default outputs (runs/...) would land here
    before = snapshot(ws)
    args = [a.replace("{ws}", str(ws)) for a in line.split()]
    r = CliRunner().invoke(main, args)
    out = r.output.strip()
    assert r.exit_code == 2, (line, r.output[-2000:], r.exception)
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("Error: ") and fragment.replace("{ws}", str(ws)) in out, out
    lower = out.lower()
    assert ("expected" in lower and "received" in lower) or "invalid value" in lower or "no such" in lower, out
    assert snapshot(ws) == before, "the working tree changed"


def test_the_table_covers_sixty_cases():
    assert len(CASES) >= 60


def test_overwrite_moves_an_earlier_result_aside_only_after_validation(ws, tmp_path, monkeypatch):
    """--overwrite on evaluate / gradcam / predict / compare keeps the earlier result beside the new one."""
    work = tmp_path / "w"
    shutil.copytree(ws / "run", work / "run")
    os.makedirs(work / "ev")
    (work / "ev" / "old.txt").write_text("old")
    (work / "g.png").write_bytes(b"old figure")
    (work / "p.csv").write_text("old")
    for args in (["evaluate", str(work / "run"), "--out", str(work / "ev"), "--overwrite"],
                 ["gradcam", str(work / "run"), "--out", str(work / "g.png"), "--overwrite", "-n", "2"],
                 ["predict", str(work / "run"), str(ws / "img.png"), "--out", str(work / "p.csv"), "--overwrite"],
                 ["compare", str(work / "run"), "--out", str(work / "ev"), "--overwrite"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    names = sorted(os.listdir(work))
    assert sum(n.startswith("ev.old-") for n in names) == 2 and "ev" in names
    assert any(n.startswith("g.png.old-") for n in names) and any(n.startswith("p.csv.old-") for n in names)
    assert os.path.exists(work / "ev" / "comparison.json")
    old = [n for n in names if n.startswith("g.png.old-")][0]
    assert (work / old).read_bytes() == b"old figure"
    # --overwrite with a bad input moves nothing
    before = snapshot(work)
    r = CliRunner().invoke(main, ["evaluate", str(work / "nothing"), "--out", str(work / "ev"), "--overwrite"])
    assert r.exit_code == 2 and snapshot(work) == before
    assert json.load(open(work / "ev" / "comparison.json"))["groups"]
    # finetune --overwrite of a finished run with a target that cannot be read: the run stays where it was
    for target in ("npz:" + str(work / "missing.npz"), "npz:" + str(ws / "negative.npz")):
        r = CliRunner().invoke(main, ["finetune", "--config", str(ws / "tiny.yaml"), "--target", target,
                                      "--out", str(work / "run"), "--overwrite"])
        assert r.exit_code == 2 and snapshot(work) == before, (target, r.output)
