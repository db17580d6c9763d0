import json
import os

import keras
import pytest
import yaml
from click.testing import CliRunner

from keras_transfer.cli import main

TINY = {"model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "data": {"batch_size": 32, "per_class": 3, "augment": "mild"}}


@pytest.fixture
def tiny_config(tmp_path, digits_npz):
    cfg = {**TINY, "data": {**TINY["data"], "source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_pretrain_finetune_evaluate_end_to_end(tmp_path, tiny_config):
    pre = str(tmp_path / "pre")
    r = invoke("pretrain", "--config", tiny_config, "--out", pre)
    assert r.exit_code == 0, r.output
    assert {"model.keras", "metrics.json", "history.csv", "config.yaml", "confusion_matrix.png"} <= set(os.listdir(pre))

    ft = str(tmp_path / "ft")
    spe = 1 if keras.config.backend() == "torch" else 2  # Keras' torch trainer runs one step per call
    r = invoke("finetune", "--config", tiny_config, "--pretrained", pre, "--out", ft,
               "--strategies", "scratch,linear,partial,full,gradual", "--finetune-epochs", "2",
               "--steps-per-execution", str(spe))
    assert r.exit_code == 0, r.output
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert set(summary["strategies"]) == {"scratch", "linear", "partial", "full", "gradual"}
    s = summary["strategies"]
    assert s["linear"]["trainable_params"] < s["partial"]["trainable_params"] < s["full"]["trainable_params"]
    # gradual: head only, then +stage3, then +stage2 (its own count is its last phase's)
    phases = json.load(open(os.path.join(ft, "strategies", "gradual", "metrics.json")))["trainable_params_by_phase"]
    assert phases[0] == s["linear"]["trainable_params"] and phases[1] == s["partial"]["trainable_params"]
    assert phases[0] < phases[1] < phases[2] == s["gradual"]["trainable_params"] < s["full"]["trainable_params"]
    for f in ("report.md", "report.html", "comparison.png", "curves.png", "config.yaml", "augmentation.png"):
        assert os.path.exists(os.path.join(ft, f)), f
    # The classical baselines on raw pixels are reference rows of the report and the terminal table.
    assert set(summary["baselines"]) == {"logreg", "knn"} and 0 < summary["baselines"]["knn"]["accuracy"] <= 1
    report = open(os.path.join(ft, "report.md")).read()
    assert "| *knn (raw pixels, reference)* |" in report and "classical baseline" in summary["verdict"]
    assert "knn (px)" in r.output
    assert all(s[st]["peak_host_mb"] > 0 for st in s)
    assert "data:image/png;base64" in open(os.path.join(ft, "report.html")).read()
    resolved = yaml.safe_load(open(os.path.join(ft, "config.yaml")))
    assert resolved["finetune"]["epochs"] == 2 and resolved["model"]["widths"] == [4, 8, 8]  # flag beat file
    assert resolved["finetune"]["steps_per_execution"] == spe
    for st in s:
        d = os.path.join(ft, "strategies", st)
        expected = {"history.csv", "metrics.json", "model.keras", "confusion_matrix.png", "misclassified.png"}
        assert expected <= set(os.listdir(d))

    r = invoke("evaluate", ft)
    assert r.exit_code == 0, r.output
    assert "macro avg" in r.output
    r = invoke("evaluate", pre, "--tta", "flip")
    assert r.exit_code == 0, r.output
    (tta_dir,) = [d for d in os.listdir(pre) if d.startswith("eval-") and d.endswith("-test-tta-flip")]
    assert json.load(open(os.path.join(pre, tta_dir, "metrics.json")))["tta"] == "flip"

    r = invoke("gradcam", ft, "-n", "4", "--out", str(tmp_path / "cam.png"))
    assert r.exit_code == 0, r.output and os.path.exists(tmp_path / "cam.png")
    # Several strategies of the run side by side on the same images; a strategy the run lacks is refused.
    r = invoke("gradcam", ft, "--strategies", "scratch,linear,full", "-n", "3")
    assert r.exit_code == 0 and os.path.exists(os.path.join(ft, "gradcam-scratch-linear-full.png")), r.output
    r = CliRunner().invoke(main, ["gradcam", ft, "--strategies", "scratch,lp-ft"])
    assert r.exit_code == 2 and "Received: lp-ft" in r.output, r.output

    r = invoke("compare", ft, pre, "--out", str(tmp_path / "cmp"))
    assert r.exit_code == 0, r.output
    assert os.path.exists(tmp_path / "cmp" / "report.html")


def test_ablation_knobs_and_each_stages_learning_rate_from_the_command_line(tmp_path, tiny_config):
    pre = str(tmp_path / "pre")
    r = invoke("pretrain", "--config", tiny_config, "--out", pre, "--no-batch-norm", "--pooling", "flatten",
               "--dropout", "0", "--head-hidden", "0", "--width", "4,8", "--blocks-per-stage", "2", "--lr", "0.05")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(open(os.path.join(pre, "config.yaml")))
    assert cfg["model"]["name"] == "resnet"
    assert (cfg["model"]["batch_norm"], cfg["model"]["pooling"], cfg["model"]["dropout"], cfg["model"]["head_hidden"],
            cfg["model"]["widths"], cfg["model"]["blocks_per_stage"]) == (False, "flatten", 0, 0, [4, 8], 2)
    assert cfg["pretrain"]["learning_rate"] == 0.05 and cfg["finetune"]["learning_rate"] == 1e-3  # --lr: this stage's
    from keras_transfer.io import load_model

    backbone = load_model(os.path.join(pre, "model.keras")).get_layer("backbone")
    layers = [type(layer).__name__ for layer in backbone.layers]
    assert "Flatten" in layers and not any("BatchNormalization" in n or "Dropout" in n for n in layers)
    assert sum(n.endswith("Conv2D") for n in layers) == 1 + 2 * 2 * 2 + 1  # stem, 2 stages x 2 blocks x 2, 1 projection


def test_existing_run_directory_is_refused_and_kept(tmp_path, tiny_config):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["pretrain", "--config", tiny_config, "--out", str(out)])
    assert r.exit_code == 2
    assert "exists and is not empty" in r.output and "Received" in r.output
    assert (out / "precious.txt").read_text() == "keep me" and os.listdir(out) == ["precious.txt"]


@pytest.mark.parametrize("args,expected", [
    (["pretrain", "--source", "imagenet21k"], "Unknown dataset"),
    (["pretrain", "--model", "vgg99"], "Unknown model"),
    (["finetune", "--strategies", "magic"], "Unknown strategy"),
    (["pretrain", "--config", "/nonexistent/run.yaml"], "Expected an existing YAML"),
    (["pretrain", "--config", "/"], "Expected an existing YAML config file. Received: '/'"),  # a directory
    (["evaluate", "/nonexistent/run"], "Expected a .keras file or a run directory"),
    (["pretrain", "--seed", "-1"], "seed: expected an integer in [0, 2**32)"),
    (["pretrain", "--width", "16,abc"], "--width: expected comma-separated integers"),
    (["pretrain", "--width", "0,0,0"], "model.widths: expected a list of positive integers"),
    (["pretrain", "--lr", "0.1", "--pretrain-lr", "0.2"], "--lr and --pretrain-lr: expected one of them"),
    (["study", "/nonexistent/study.yaml"], "Expected an existing study file"),
    (["finetune", "--lr", "inf"], "finetune.learning_rate: expected a learning rate > 0. Received: inf"),
    (["finetune", "--backbone-lr", "nan"], "transfer.backbone_lr: expected a learning-rate multiplier > 0"),
    (["finetune", "--resume", "/"], "Expected a run directory (with config.yaml) for --resume"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, expected):
    r = CliRunner().invoke(main, args + (["--out", str(tmp_path / "o")] if args[0] != "evaluate" else []))
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Received" in err[0]
    assert not (tmp_path / "o").exists()  # refused before any run directory


@pytest.mark.parametrize("section,key,value,expected", [
    ("model", "bn_bias_lr", 0, "model.bn_bias_lr: expected a positive learning-rate multiplier. Received: 0"),
    ("pretrain", "lookahead_decay", 1.5, "Lookahead: expected every >= 1, 0 < decay < 1"),
    ("pretrain", "optimizer", "adagrad", "Unknown optimizer: expected one of sgd, adam, adamw. Received: 'adagrad'"),
    ("pretrain", "schedule", "step", "Unknown schedule: expected one of cosine, triangle, plateau, constant."),
    ("data", "flips", "sometimes", "data.flips: expected true, false, alternate or null. Received: 'sometimes'"),
    ("pretrain", "steps_per_execution", 0, "pretrain.steps_per_execution: expected an integer >= 1. Received: 0"),
    ("data", "drop_last", "sometimes", "data.drop_last: expected true or false. Received: 'sometimes'"),
    ("data", "batch_size", 0, "data.batch_size: expected an integer >= 1. Received: 0"),
    ("data", "fraction", 2, "data.fraction: expected null or a fraction in (0, 1]. Received: 2"),
    ("data", "image_size", -4, "data.image_size: expected a positive number of pixels or null. Received: -4"),
    ("model", "channels", 2, "model.channels: expected null, 1 (grey) or 3 (RGB). Received: 2"),
    ("pretrain", "learning_rate", -0.1, "pretrain.learning_rate: expected a learning rate > 0. Received: -0.1"),
    ("finetune", "epochs", 0, "finetune.epochs: expected an integer >= 1. Received: 0"),
    ("pretrain", "label_smoothing", 1.0, "pretrain.label_smoothing: expected a value in [0, 1). Received: 1.0"),
    ("transfer", "layer_decay", 1.5, "transfer.layer_decay: expected a factor in (0, 1]. Received: 1.5"),
    ("transfer", "backbone_lr", 0, "transfer.backbone_lr: expected a learning-rate multiplier > 0. Received: 0"),
    ("model", "widths", "64,128", "model.widths: expected a list of positive integers (filters per stage). "
                                  "Received: '64,128'"),
    ("model", "batch_norm", "yes", "model.batch_norm: expected true or false. Received: 'yes'"),
    ("model", "pooling", "max", "model.pooling: expected one of avg, flatten. Received: 'max'"),
    ("model", "blocks_per_stage", 0, "model.blocks_per_stage: expected an integer >= 1. Received: 0"),
    ("transfer", "train_last_k", 9, "transfer.train_last_k: expected an integer in 0..4 (the blocks of resnet). "
                                    "Received: 9"),
    ("transfer", "baselines", ["svm"], "transfer.baselines: expected some of logreg, knn. Received: 'svm'"),
])
def test_bad_recipe_value_is_one_line_and_nonzero(tmp_path, tiny_config, section, key, value, expected):

    cfg = yaml.safe_load(open(tiny_config))
    cfg.setdefault(section, {}).update({key: value, **({"lookahead_every": 5} if section == "pretrain" else {})})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["pretrain", "--config", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "o").exists()  # refused when the config is read, before any run directory


def test_steps_per_execution_on_torch_is_refused_before_the_run_directory(tmp_path, tiny_config):
    if keras.config.backend() != "torch":
        pytest.skip("JAX and TensorFlow run several steps per execution (tested in test_train)")
    r = CliRunner().invoke(main, ["pretrain", "--config", tiny_config, "--steps-per-execution", "4",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and "expected 1 on the torch backend" in err[0] and "Received: 4" in err[0]
    assert not (tmp_path / "o").exists()


def test_class_count_mismatch_on_evaluate(tmp_path, tiny_config):
    pre = str(tmp_path / "pre")
    assert invoke("pretrain", "--config", tiny_config, "--out", pre).exit_code == 0
    r = CliRunner().invoke(main, ["evaluate", os.path.join(pre, "model.keras"), "--dataset", "mnist_5k"])
    assert r.exit_code == 2 and "Shape mismatch" in r.output
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(open(os.path.join(pre, "model.keras"), "rb").read()[:3000])
    for args in (["evaluate", str(truncated), "--dataset", "digits"],
                 ["finetune", "--config", tiny_config, "--pretrained", str(truncated), "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(main, args)
        err = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(err) == 1, r.output
        assert "truncated.keras: expected a complete Keras .keras (zip) file. Received: 3,000 bytes" in err[0]
    assert not (tmp_path / "o").exists()


def test_image_folder_target_of_mixed_sizes_and_a_corrupted_image(tmp_path, tiny_config):
    """A folder of photos of different sizes fine-tunes at --image-size and evaluates at the model's size;
    a corrupted image stops the next run with one line, exit 2 and no run directory left behind."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "photos" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            h, w = (8, 8) if i % 2 else (12, 10)
            img = rng.integers(0, 60, (h, w, 3), np.uint8) + np.uint8(90 * c)
            Image.fromarray(img if i % 3 else img[..., 0]).save(tmp_path / "photos" / f"class{c}" / f"{i}.png")
    target = f"folder:{tmp_path / 'photos'}"
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--target", target, "--image-size", "10",
               "--strategies", "linear", "--out", ft)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(open(os.path.join(ft, "config.yaml")))["data"]["image_size"] == 10
    model = keras.saving.load_model(os.path.join(ft, "strategies", "linear", "model.keras"))
    assert tuple(model.input.shape[1:]) == (10, 10, 3)
    r = invoke("evaluate", ft)  # loads the folder at the model's 10x10 (its own default would be 8x8)
    assert r.exit_code == 0, r.output

    (tmp_path / "photos" / "class1" / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    # The target is read before pretraining: the one line is all the output, with or without a preview.
    for preview in ("--preview", "--no-preview"):
        r = CliRunner().invoke(main, ["finetune", "--config", tiny_config, "--target", target, "--out",
                                      str(tmp_path / "again"), preview])
        assert r.exit_code == 2, r.output
        err = r.output.strip().splitlines()
        assert len(err) == 1 and "99.png: expected a complete image file" in err[0] and "Received" in err[0]
    assert not (tmp_path / "again").exists()


def test_evaluate_and_gradcam_read_the_runs_dataset_and_data_root(tmp_path, tiny_config, digits_npz, monkeypatch):
    """A run's dataset and --data-dir are its evaluate / gradcam defaults, also for a finetune run's pretrain/;
    the run's relative --data-dir is found from another working directory; so for a model file inside the
    run (a strategy's, a checkpoint); a run directory without a readable config.yaml, or a model file outside
    a run, needs --dataset, said in one line."""
    import shutil

    import numpy as np

    d = np.load(digits_npz)
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    np.savez(root / "mnist" / "train.npz", x=d["x"][:300], y=d["y"][:300], class_names=d["class_names"])
    np.savez(root / "mnist" / "test.npz", x=d["x"][300:], y=d["y"][300:], class_names=d["class_names"])
    monkeypatch.setenv("KTRANSFER_DATA_DIR", str(tmp_path / "elsewhere"))  # the default root holds nothing
    ft = tmp_path / "ft"
    monkeypatch.chdir(tmp_path)
    r = invoke("finetune", "--config", tiny_config, "--source", "mnist", "--target", "mnist", "--data-dir",
               "data", "--strategies", "linear", "--out", str(ft), "--no-preview")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(open(ft / "config.yaml"))["data"]["data_dir"] == str(root)  # recorded absolute
    monkeypatch.chdir(tmp_path / "data" / "mnist")
    linear = ft / "strategies" / "linear"
    for args in (["evaluate", str(ft)], ["evaluate", str(ft / "pretrain")],
                 ["gradcam", str(ft / "pretrain"), "-n", "2"],
                 # model files inside the run: a strategy's, a checkpoint, pretrain/'s
                 # the same default output as `evaluate ft` (its best strategy): refused, unless --overwrite
                 ["evaluate", str(linear / "model.keras"), "--overwrite"],
                 ["gradcam", str(linear / "checkpoints" / "best.keras"), "-n", "2", "--out", str(tmp_path / "c.png")],
                 ["evaluate", str(ft / "pretrain" / "model.keras"), "--split", "train"]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    assert json.load(open(ft / "pretrain" / "eval-mnist-test" / "metrics.json"))["n"] == 100
    assert json.load(open(ft / "pretrain" / "eval-mnist-train" / "metrics.json"))["n"] == 300
    assert json.load(open(linear / "eval-mnist-test" / "metrics.json"))["n"] == 100
    assert any(n.startswith("eval-mnist-test.old-") for n in os.listdir(linear))  # the earlier result, kept
    r = CliRunner().invoke(main, ["evaluate", str(linear / "model.keras")])
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    assert (ft / "pretrain" / "gradcam.png").exists() and (tmp_path / "c.png").exists()
    shutil.copy(linear / "model.keras", tmp_path / "loose.keras")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "loose.keras")])
    err = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(err) == 1 and "A .keras file outside a run directory needs --dataset" in err[0]

    bare = tmp_path / "bare"
    shutil.copytree(ft, bare)
    (bare / "config.yaml").unlink()
    (broken := tmp_path / "broken").mkdir()
    shutil.copytree(ft / "pretrain", broken / "pretrain")
    (broken / "config.yaml").write_text("data: [unclosed\n")
    for run, expected in ((bare, "Expected a run directory with config.yaml (or --dataset)"),
                          (broken / "pretrain", "Expected a YAML run configuration in")):
        r = CliRunner().invoke(main, ["evaluate", str(run)])
        err = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(err) == 1 and expected in err[0], r.output
    r = invoke("evaluate", str(bare), "--dataset", "mnist", "--data-dir", str(root), "--overwrite")  # a copied result
    assert r.exit_code == 0, r.output


def test_listing_commands():
    r = invoke("datasets")
    assert r.exit_code == 0 and "emnist_letters" in r.output and "mnist_5k" in r.output
    r = invoke("info")
    assert r.exit_code == 0 and "backend" in r.output
    r = invoke("models", "--size", "32")
    lines = {line.split()[0]: line for line in r.output.splitlines() if line.strip() and not line.startswith(" ")}
    assert r.exit_code == 0, r.output
    # every block once (a model of four blocks had its last one printed twice), the count of a long list
    assert lines["airbench"].endswith("; blocks (4): whiten, group1, group2, group3"), lines["airbench"]
    assert lines["efficientnet_b0"].endswith("; blocks (9): stem, block1, block2, block3, ..., top"), r.output
    assert "pixels to [-1, 1];" in lines["mobilenet_v2"] and "pixels as 0..255;" in lines["efficientnet_b0"]
    for cmd in ("pretrain", "finetune", "evaluate", "gradcam", "predict", "compare", "datasets", "models", "info"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_resume_a_finetune_run(tmp_path, tiny_config):
    """A run whose last strategy was interrupted continues it from its checkpoint; finished ones are kept."""
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--out", ft, "--strategies", "linear,full",
               "--finetune-epochs", "2", "--no-preview")
    assert r.exit_code == 0, r.output
    linear_before = json.load(open(os.path.join(ft, "strategies", "linear", "metrics.json")))
    # Simulate a `full` killed after its last checkpoint, before its results: no metrics.json, and a history row
    # (and half of another) written after the checkpoint, which the resumed run must cut.
    full = os.path.join(ft, "strategies", "full")
    os.remove(os.path.join(full, "metrics.json"))
    hist_before = open(os.path.join(full, "history.csv")).read()
    lines = hist_before.splitlines()
    open(os.path.join(full, "history.csv"), "w").write("\n".join(lines + [lines[-1]]) + "\n" + lines[-1][:7])
    r = invoke("finetune", "--resume", ft)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    assert json.load(open(os.path.join(ft, "strategies", "linear", "metrics.json"))) == linear_before
    assert open(os.path.join(full, "history.csv")).read() == hist_before  # header + epochs 0 and 1
    assert os.path.exists(os.path.join(full, "metrics.json"))


def test_host_memory_reuse_is_set_on_glibc_and_can_be_turned_off(monkeypatch):
    import ctypes
    import sys

    from keras_transfer.cli import keep_freed_host_memory

    monkeypatch.setenv("KTRANSFER_MALLOC_TUNING", "off")
    assert keep_freed_host_memory() is False
    monkeypatch.delenv("KTRANSFER_MALLOC_TUNING")
    calls = []

    class FakeLibc:  # records what is asked of glibc's mallopt, and says it took it
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert keep_freed_host_memory() is True
    assert calls == [(-3, 1 << 30), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, then M_TRIM_THRESHOLD, both 1 GiB

    def not_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", not_glibc)
    assert keep_freed_host_memory() is False


def test_finetune_records_the_pretrained_model_and_where_it_came_from(tmp_path, tiny_config, digits_npz):
    """--pretrained goes into config.yaml (transfer.pretrained) with the pretrain run's source and backbone,
    so the report names them and --resume continues from the same model instead of pretraining anew;
    a --source that contradicts the pretrained run is refused in one line."""
    from keras_transfer import config as config_lib
    from keras_transfer.pretrained import with_pretrained

    pre = str(tmp_path / "pre")
    assert invoke("pretrain", "--config", tiny_config, "--out", pre).exit_code == 0
    # the airbench recipe's pretraining key does not stop fine-tuning a residual CNN (no pretraining runs)
    recipe = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "experiments", "cifar10_fast.yaml"))
    assert recipe.pretrain.whiten_bias_epochs == 3
    resolved = with_pretrained(recipe, pre)
    assert resolved.model.name == "resnet" and resolved.pretrain.whiten_bias_epochs is None
    cfg = yaml.safe_load(open(tiny_config))
    cfg["data"]["source"] = "mnist_5k"  # the file's own defaults, not what the pretrained model saw
    cfg["model"]["widths"] = [16, 16, 16]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", str(other), "--pretrained", pre, "--strategies", "linear,full", "--out", ft)
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(open(os.path.join(ft, "config.yaml")))
    resolved_file = os.path.join(pre, "model.keras")
    assert resolved["transfer"]["pretrained"] == resolved_file
    assert resolved["data"]["source"] == f"npz:{digits_npz}" and resolved["model"]["widths"] == [4, 8, 8]
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert summary["source"] == f"npz:{digits_npz}" and summary["model"] == "resnet"
    assert summary["pretrain_accuracy"] == json.load(open(os.path.join(pre, "metrics.json")))["accuracy"]
    report = open(os.path.join(ft, "report.md")).read()
    assert report.startswith(f"# Transfer report: npz:{digits_npz} → digits")
    assert f"Pretrained model: `{os.path.join(pre, 'model.keras')}`, trained on digits" in report

    os.remove(os.path.join(ft, "strategies", "full", "metrics.json"))  # as if stopped during "full"
    r = invoke("finetune", "--resume", ft)
    assert r.exit_code == 0, r.output
    assert not any(line.startswith("pretrain") for line in r.output.splitlines())  # no pretraining ran
    assert not os.path.exists(os.path.join(ft, "pretrain"))
    assert os.path.exists(os.path.join(ft, "strategies", "full", "metrics.json"))
    # a run recorded before transfer.pretrained resumes from the --pretrained given again; another is refused
    old = yaml.safe_load(open(os.path.join(ft, "config.yaml")))
    del old["transfer"]["pretrained"]
    open(os.path.join(ft, "config.yaml"), "w").write(yaml.safe_dump(old))
    os.remove(os.path.join(ft, "strategies", "full", "metrics.json"))
    r = invoke("finetune", "--resume", ft, "--pretrained", pre)
    assert r.exit_code == 0, r.output
    assert not os.path.exists(os.path.join(ft, "pretrain"))
    assert yaml.safe_load(open(os.path.join(ft, "config.yaml")))["transfer"]["pretrained"] == resolved_file
    r = CliRunner().invoke(main, ["finetune", "--resume", ft, "--pretrained", os.path.join(ft, "strategies", "full")])
    assert r.exit_code == 2 and f"--pretrained: expected the run's own {resolved_file}" in r.output, r.output

    r = CliRunner().invoke(main, ["finetune", "--config", tiny_config, "--pretrained", pre, "--source", "mnist",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: --source: expected 'npz:") and "Received: 'mnist'" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_bare_pretrained_model_file_keeps_its_own_input_contract(tmp_path, tiny_config):
    """A .keras file with no run beside it, of another registered model than the config names: the
    fine-tuned classifier gets that model's preprocessing (MobileNetV2: pixels to [-1, 1]), not the
    configured residual CNN's per-channel normalisation, and the report names the file."""
    from keras_transfer.models import build_classifier, create_backbone

    backbone = create_backbone("mobilenet_v2", 32, 3)
    model_file = str(tmp_path / "mobilenet.keras")
    build_classifier(backbone, "mobilenet_v2", (32, 32, 3), 10, head_hidden=0).save(model_file)
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--pretrained", model_file, "--strategies", "linear",
               "--out", ft)
    assert r.exit_code == 0, r.output
    tuned = keras.saving.load_model(os.path.join(ft, "strategies", "linear", "model.keras"))
    names = [layer.name for layer in tuned.layers]
    assert "pre_norm" not in names
    scale = tuned.get_layer("pre_scale")
    assert scale.scale == pytest.approx(1 / 127.5) and scale.offset == -1.0
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert summary["model"] == "mobilenet_v2" and summary["source"] == "mobilenet.keras"
    assert "where it was trained is not recorded" in open(os.path.join(ft, "report.md")).read()


def test_model_flag_brings_its_own_input_size_and_channels(tmp_path, tiny_config):
    """The embedded default (and a config file) size the input for its own model (the residual CNN at
    28x28 grey); --model efficientnet_b0 used to stop on "needs inputs of at least 32x32. Received: 28"."""
    from keras_transfer.cli import resolve_config

    cfg = resolve_config(None, {"model_name": "efficientnet_b0"})
    assert (cfg.model.name, cfg.model.input_size, cfg.model.channels) == ("efficientnet_b0", 224, 3)
    cfg = resolve_config(tiny_config, {"model_name": "airbench", "input_size": 16})
    assert (cfg.model.input_size, cfg.model.channels) == (16, 3)  # a flag still wins
    cfg = resolve_config(tiny_config, {"model_name": "resnet"})  # the config's own model: its sizes stay
    assert (cfg.model.input_size, cfg.model.channels) == (8, 1)
    r = CliRunner().invoke(main, ["pretrain", "--model", "efficientnet_b0", "--input-size", "16",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert "at least 32x32 (model.input_size, --input-size; its default is 224). Received: 16" in r.output


def test_predict_classifies_image_files_with_the_runs_class_names(tmp_path, tiny_config):
    """`ktransfer predict RUN IMAGES...`: files and folders, any size or mode, decoded as the run read its
    image folder; the same classes and probabilities as the model on the folder's arrays; class names from
    the run; a CSV written only to a new file; a missing path refused in one line."""
    import csv

    import numpy as np
    from PIL import Image

    from keras_transfer.data.formats import read_image_folder
    from keras_transfer.evaluate import predict_logits, softmax

    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "mid", "light")):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 60, (12, 12, 3), np.uint8) + np.uint8(90 * c)
            Image.fromarray(img).save(tmp_path / "photos" / name / f"{i}.png")
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--target", f"folder:{tmp_path / 'photos'}", "--per-class", "5",
               "--strategies", "linear", "--out", ft, "--no-preview")
    assert r.exit_code == 0, r.output
    odd = tmp_path / "odd.png"  # grey and of another size: converted and resized to the model's input
    Image.fromarray(rng.integers(0, 255, (30, 20), np.uint8)).save(odd)
    out = tmp_path / "pred.csv"
    r = invoke("predict", ft, str(tmp_path / "photos" / "mid"), str(odd), "--top-k", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["image", "class", "probability", "class2", "p2"] and len(rows) == 1 + 8 + 1
    model = keras.saving.load_model(os.path.join(ft, "strategies", "linear", "model.keras"))
    x, _, classes = read_image_folder(str(tmp_path / "photos"))
    probs = softmax(predict_logits(model, x[16:24]))  # the "mid" class (third, sorted), in file order
    assert classes == ["dark", "light", "mid"]
    for row, p in zip(rows[1:9], probs):
        assert row[1] == classes[p.argmax()] and float(row[2]) == pytest.approx(p.max(), abs=1e-4)
        assert float(row[2]) >= float(row[4])
    assert rows[9][0] == str(odd) and rows[9][1] in classes
    r = CliRunner().invoke(main, ["predict", ft, str(odd), "--out", str(out)])
    assert r.exit_code == 2 and "exists: expected a new file for --out" in r.output
    r = CliRunner().invoke(main, ["predict", ft, str(tmp_path / "nothing.png")])
    err = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(err) == 1 and "nothing.png does not exist" in err[0]


def test_backbone_learning_rate_reaches_the_backbone_of_full_and_gradual(tmp_path, tiny_config):
    """``--backbone-lr`` trains the pretrained backbone of ``full`` and ``gradual`` at that multiple of the
    head's rate: at 1e-6 their backbone kernels stay at the pretrained values (within 1e-5) while the
    head moves; ``scratch`` is not slowed."""
    import numpy as np

    pre = str(tmp_path / "pre")
    assert invoke("pretrain", "--config", tiny_config, "--out", pre).exit_code == 0
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--pretrained", pre, "--out", ft, "--strategies",
               "scratch,full,gradual", "--backbone-lr", "1e-6", "--layer-decay", "0.5", "--finetune-epochs", "2",
               "--no-preview")
    assert r.exit_code == 0, r.output

    def kernels(path):
        model = keras.saving.load_model(path)
        return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights if v.path.endswith("kernel")}

    start = kernels(os.path.join(pre, "model.keras"))
    for strategy in ("full", "gradual"):
        after = kernels(os.path.join(ft, "strategies", strategy, "model.keras"))
        shared = [p for p in start if p in after and not p.startswith("head")]
        assert shared and all(np.allclose(after[p], start[p], atol=1e-5) for p in shared), strategy
        metrics = json.load(open(os.path.join(ft, "strategies", strategy, "metrics.json")))
        assert (metrics["backbone_lr"], metrics["layer_decay"]) == (1e-6, 0.5)
    scratch = json.load(open(os.path.join(ft, "strategies", "scratch", "metrics.json")))
    assert "backbone_lr" not in scratch
    report = open(os.path.join(ft, "report.md")).read()
    assert "full, gradual trained the pretrained backbone at 1e-06 × 0.5^d" in report


def test_finetune_from_a_weights_file_skips_pretraining_and_starts_from_exactly_those_weights(tmp_path, tiny_config):
    """--weights FILE is the source: no pretraining stage, and the frozen backbone of `linear` holds exactly the
    file's values (BatchNorm statistics included) after training."""
    import numpy as np

    from keras_transfer.io import load_model
    from keras_transfer.models import create_backbone

    source = create_backbone("resnet", 8, 1, widths=(4, 8, 8))
    rng = np.random.default_rng(0)
    source.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") + (1.0 if "variance" in v.path else 0.0)
                        for w, v in zip(source.get_weights(), source.weights)])
    path = str(tmp_path / "mine.weights.h5")
    source.save_weights(path)
    ft = str(tmp_path / "ft")
    r = invoke("finetune", "--config", tiny_config, "--weights", path, "--out", ft, "--strategies", "linear,full",
               "--no-preview")
    assert r.exit_code == 0, r.output
    assert "no pretraining stage" in r.output and not os.path.exists(os.path.join(ft, "pretrain"))
    linear = load_model(os.path.join(ft, "strategies", "linear", "model.keras")).get_layer("backbone")
    for a, b in zip(source.get_weights(), linear.get_weights()):
        np.testing.assert_array_equal(a, b)
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert summary["source"] == "mine.weights.h5" and set(summary["strategies"]) == {"linear", "full"}
    assert "no pretraining stage" in open(os.path.join(ft, "report.md")).read()


def test_finetune_from_imagenet_offline_is_one_line_and_leaves_no_run_directory(tmp_path, tiny_config, monkeypatch):
    import keras.src.utils.file_utils as fu

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # an empty weights cache

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fu.urllib.request, "urlretrieve", offline)
    ft = str(tmp_path / "ft")
    for flags in (["--weights", "imagenet"], ["--source", "imagenet"]):
        r = CliRunner().invoke(main, ["finetune", "--config", tiny_config, "--model", "mobilenet_v2", "--input-size",
                                      "32", *flags, "--out", ft, "--no-preview"])
        assert r.exit_code == 2, r.output
        line = r.output.strip()
        assert "\n" not in line and "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in line
        assert os.path.join(str(tmp_path / "keras-home"), "models") in line
        assert not os.path.exists(ft)
    r = CliRunner().invoke(main, ["finetune", "--source", "imagenet", "--weights", "x.h5"])
    assert r.exit_code == 2 and "--source imagenet starts from ImageNet weights" in r.output


KILLED_CHILD = """
import sys, time
from keras_transfer import callbacks

write_row = callbacks.HistoryLogger.on_epoch_end

def slow(self, epoch, logs=None):  # a pause after each history row: the kill lands between row and checkpoint
    write_row(self, epoch, logs)
    time.sleep(0.4)

callbacks.HistoryLogger.on_epoch_end = slow
from keras_transfer.cli import main
main(sys.argv[1:])
"""


def test_a_run_killed_with_sigkill_resumes_to_the_results_of_an_uninterrupted_one(tmp_path, tiny_config):
    """A real `kill -9` of `ktransfer finetune` in the middle of pretraining, and another in the middle of a
    strategy's epochs (each after an epoch's history row, where a kill used to resume one epoch off), then
    `--resume`: the same test metrics as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    args = ["finetune", "--config", tiny_config, "--strategies", "partial", "--pretrain-epochs", "3",
            "--finetune-epochs", "3", "--augment", "none", "--no-preview"]
    whole = str(tmp_path / "whole")
    assert invoke(*args, "--out", whole).exit_code == 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for stage in ("pretrain", "strategies/partial"):
        killed = str(tmp_path / stage.replace("/", "-"))
        child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, *args, "--out", killed], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        history = os.path.join(killed, stage, "history.csv")
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and child.poll() is None:
                if os.path.exists(history) and len(open(history).read().splitlines()) >= 3:  # header + 2 epochs
                    break
                time.sleep(0.02)
            assert child.poll() is None, "the run ended before it could be killed"
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert not os.path.exists(os.path.join(killed, "summary.json"))
        r = invoke("finetune", "--resume", killed)
        assert r.exit_code == 0 and "resuming" in r.output, r.output
        for d in ("pretrain", "strategies/partial"):
            a, b = (json.load(open(os.path.join(run, d, "metrics.json"))) for run in (whole, killed))
            assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6), (stage, d)
            assert b["macro"]["f1"] == pytest.approx(a["macro"]["f1"], abs=1e-6), (stage, d)
            assert len(open(os.path.join(killed, d, "history.csv")).read().splitlines()) == 4  # header + 3 epochs
