"""Export (keras_transfer.export, `ktransfer export`): a classifier rebuilt from Keras' own layers predicts what
the run's model predicts, and loads in a Python where keras_transfer cannot be imported."""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from keras_transfer.cli import main
from keras_transfer.errors import ConfigError
from keras_transfer.evaluate import softmax
from keras_transfer.export import export, foreign_layers, portable_model
from keras_transfer.methods import BatchSpectralShrinkage
from keras_transfer.models import build_classifier, create_backbone
from tests.conftest import python_prints_ok, write_digits_npz

TOLERANCE = 1e-5  # probabilities: the same operations, some in another Keras layer (float32 rounding)
TINY = {"model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "data": {"batch_size": 32, "per_class": 3, "augment": "mild"}}


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def jittered(backbone, seed=0):
    rng = np.random.default_rng(seed)
    backbone.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in backbone.get_weights()])
    return backbone


@pytest.mark.parametrize("name,size,channels,image_shape", [
    ("resnet", 8, 1, (8, 8, 1)),          # the fast layers, the freezable dropout
    ("airbench", 16, 3, (12, 12, 1)),     # Bias, grey repeated to RGB, resizing
    ("vgg16", 32, 3, (32, 32, 3)),        # RGB -> BGR (caffe preprocessing)
])
def test_the_portable_model_is_keras_only_and_predicts_the_same(name, size, channels, image_shape):
    widths = {"vgg16": {}}.get(name, {"widths": (4, 8, 8)})
    backbone = jittered(create_backbone(name, size, channels, **widths))
    model = build_classifier(backbone, name, image_shape, 5, head_hidden=8,
                             feature_penalty=BatchSpectralShrinkage(0.1, 1, name="head_bss"))
    assert foreign_layers(model)
    portable = portable_model(model)
    assert foreign_layers(portable) == []
    x = np.random.default_rng(1).integers(0, 256, (6, *image_shape), dtype=np.uint8)
    expected = softmax(np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0))))
    got = np.asarray(keras.ops.convert_to_numpy(portable.predict(x, verbose=0)))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    assert portable.output.shape[-1] == 5 and portable.input.dtype == "uint8"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One fine-tuned run for the module's tests (each leaves it as it found it, or adds only its exports)."""
    tmp_path = tmp_path_factory.mktemp("export")
    digits_npz = write_digits_npz(tmp_path)
    cfg = {**TINY, "data": {**TINY["data"], "source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    r = CliRunner().invoke(main, ["finetune", "--config", str(path), "--out", run, "--strategies", "linear,full",
                                  "--no-preview"])
    assert r.exit_code == 0, r.output
    return run


def test_an_exported_run_loads_and_predicts_without_the_package(tmp_path, finished_run, digits_npz):
    r = invoke("export", finished_run)  # the run's best strategy
    assert r.exit_code == 0, r.output
    strategies = json.load(open(os.path.join(finished_run, "summary.json")))["strategies"]
    best = max(strategies, key=lambda k: strategies[k]["accuracy"])
    out = os.path.join(finished_run, "export", f"{best}.keras")
    assert os.path.isfile(out) and "loads without keras-transfer" in r.output
    x = np.load(digits_npz)["x"][:20]
    from keras_transfer.io import load_model

    run_model = load_model(os.path.join(finished_run, "strategies", best, "model.keras"))
    expected = softmax(np.asarray(keras.ops.convert_to_numpy(run_model.predict(x, verbose=0))))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    python_prints_ok(
        "import sys\nsys.modules['keras_transfer'] = None  # not importable here\n"
        "import keras, numpy as np\n"
        f"model = keras.saving.load_model({out!r})\n"
        "p = np.asarray(keras.ops.convert_to_numpy(model.predict(np.load('x.npy'), verbose=0)))\n"
        f"assert np.abs(p - np.load('expected.npy')).max() < {TOLERANCE}\n"
        "print('ok')", keras.config.backend(), str(tmp_path))
    # an existing export is refused; --overwrite moves it aside; --strategy picks another
    r = invoke("export", finished_run)
    assert r.exit_code == 2 and "exists: expected a new file for --out" in r.output
    assert invoke("export", finished_run, "--overwrite").exit_code == 0
    assert any(n.startswith(f"{best}.keras.old-") for n in os.listdir(os.path.join(finished_run, "export")))
    other = ({"linear", "full"} - {best}).pop()
    assert invoke("export", finished_run, "--strategy", other).exit_code == 0
    assert os.path.isfile(os.path.join(finished_run, "export", f"{other}.keras"))


def tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def test_export_refuses_a_strategy_the_run_does_not_have_and_an_out_of_another_kind(finished_run):
    before = tree(finished_run)
    r = invoke("export", finished_run, "--strategy", "gradual")
    assert r.exit_code == 2 and "expected one of the run's strategies" in r.output
    r = invoke("export", finished_run, "--out", os.path.join(finished_run, "model.h5"))
    assert r.exit_code == 2 and "expected a path ending in .keras for --format keras. Received:" in r.output
    assert tree(finished_run) == before


def _savedmodel_supported():
    return importlib.util.find_spec("tensorflow") is not None and keras.config.backend() in ("tensorflow", "jax")


def test_savedmodel_export_serves_the_same_probabilities(tmp_path):
    model = build_classifier(jittered(create_backbone("resnet", 8, 1, widths=(4, 8, 8))), "resnet", (8, 8, 1), 3,
                             head_hidden=8)
    out = str(tmp_path / "saved")
    if not _savedmodel_supported():  # Keras 3.15's torch exporter fails on this model: one line says so
        with pytest.raises(ConfigError, match=r"^Export to savedmodel.*expected .* Received: [^\n]*$"):
            export(model, out, "savedmodel")
        return
    export(model, out, "savedmodel")
    x = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    expected = softmax(np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0))))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    python_prints_ok(
        "import sys\nsys.modules['keras_transfer'] = None\nimport numpy as np, tensorflow as tf\n"
        f"served = tf.saved_model.load({out!r})\n"
        "p = served.serve(tf.constant(np.load('x.npy'))).numpy()\n"
        f"assert np.abs(p - np.load('expected.npy')).max() < {TOLERANCE}\nprint('ok')",
        keras.config.backend(), str(tmp_path))


def test_a_format_this_backend_cannot_export_is_one_line_and_leaves_nothing(finished_run):
    fmt = "onnx"
    has_exporter = (importlib.util.find_spec("tf2onnx") is not None if keras.config.backend() != "torch"
                    else importlib.util.find_spec("onnxscript") is not None)
    if has_exporter:
        pytest.skip("an ONNX exporter is installed here: the format exports")
    before = tree(finished_run)
    r = invoke("export", finished_run, "--format", fmt)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Export to onnx" in line and "expected" in line, line
    r = invoke("export", finished_run, "--format", fmt, "--out", os.path.join(finished_run, "a", "b", "m.onnx"))
    assert r.exit_code == 2 and not os.path.exists(os.path.join(finished_run, "a"))  # folders made for it go too
    assert tree(finished_run) == before
