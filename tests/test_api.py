"""The Python API (keras_transfer.api, exported by keras_transfer): a user's own Keras model registered as a
backbone, its blocks derived or given, strategies that freeze what they say, and `finetune` end to end."""

import json
import os

import keras
import numpy as np
import pytest
from keras import layers

import keras_transfer as kt
from keras_transfer.errors import ConfigError
from keras_transfer.models import get_spec
from keras_transfer.train import compile_model
from tests.conftest import python_prints_ok


@pytest.fixture(autouse=True)
def registrations_stay_in_the_test(monkeypatch):
    """Models registered by a test are forgotten after it, so that other test modules see the package's own."""
    from keras_transfer import api
    from keras_transfer.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(api, "_OWN", dict(api._OWN))


def user_model(name="mine"):
    """A small functional network of the user's own, named as people name layers."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stage1_conv")(x)
    x = layers.BatchNormalization(name="stage1_bn")(x)
    x = layers.Activation("relu", name="stage1_relu")(x)
    x = layers.Conv2D(8, 3, padding="same", name="stage2_conv")(x)
    x = layers.BatchNormalization(name="stage2_bn")(x)
    return keras.Model(inputs, x, name=name)


def weights_of(model, prefix):
    bb = model.get_layer("backbone")
    return {f"{layer.name}/{v.name}": np.array(keras.ops.convert_to_numpy(v))
            for layer in bb.layers if layer.name.startswith(prefix) for v in layer.weights}


@pytest.mark.parametrize("fn,registered", [("EfficientNetB0", "efficientnet_b0"), ("ResNet50", "resnet50"),
                                           ("MobileNetV2", "mobilenet_v2"), ("VGG16", "vgg16")])
def test_blocks_derived_from_keras_applications_layer_names_group_layers_as_the_registry_does(fn, registered):
    model = getattr(keras.applications, fn)(include_top=False, weights=None, input_shape=(32, 32, 3))
    spec = kt.register_backbone(f"derived_{registered}", model, value_range=get_spec(registered).value_range)
    ref = get_spec(registered)
    assert len(spec.blocks) == len(ref.blocks)
    mine = [spec.blocks.index(b) for b in spec.layer_blocks(model).values()]
    theirs = [ref.blocks.index(b) for b in ref.layer_blocks(model).values()]
    assert mine == theirs


def test_a_users_model_freezes_by_its_derived_blocks_and_trains_the_rest():
    spec = kt.register_backbone("mine", user_model())
    assert spec.blocks == ("stem", "stage1", "stage2") and spec.gradcam_layer == "stage2_bn"
    model = kt.classifier("mine", (8, 8, 1), 3, head_hidden=0)  # grey images: repeated to the model's 3 channels
    kt.apply_strategy(model, "mine", "partial", train_last_k=1)
    trainable, _ = kt.parameter_counts(model)
    stage2 = (3 * 3 * 8 * 8 + 8) + 2 * 8  # conv kernel and bias, BatchNorm's scale and shift
    head = 8 * 3 + 3
    assert trainable == stage2 + head
    compile_model(model, kt.RunConfig().finetune, 2)  # compiled after the flags are set
    before = {**weights_of(model, "stem"), **weights_of(model, "stage1")}
    stage2_before = weights_of(model, "stage2")["stage2_conv/kernel"]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = {**weights_of(model, "stem"), **weights_of(model, "stage1")}
    for key in before:  # frozen blocks, BatchNorm statistics included (inference mode), bit-identical
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert not np.array_equal(weights_of(model, "stage2")["stage2_conv/kernel"], stage2_before)  # it trained


def test_blocks_given_as_prefixes_or_a_mapping():
    spec = kt.register_backbone("mine_two", user_model(), blocks={"early": ["stem", "stage1"], "late": ["stage2"]})
    assert spec.blocks == ("early", "late")
    assert set(spec.layer_blocks(user_model()).items()) >= {("stem_conv", "early"), ("stage1_bn", "early"),
                                                            ("stage2_conv", "late")}
    model = kt.classifier("mine_two", (8, 8, 3), 3)
    kt.apply_strategy(model, "mine_two", "partial", train_last_k=1)
    bb = model.get_layer("backbone")
    assert not bb.get_layer("stage1_conv").trainable and bb.get_layer("stage2_conv").trainable
    assert kt.register_backbone("mine_list", user_model(), blocks=["stem", "stage2"]).blocks == ("stem", "stage2")


@pytest.mark.parametrize("kwargs,expected", [
    ({"blocks": ["stage2", "stem"]}, "in order from the input"),
    ({"blocks": ["stem", "nothing"]}, "'nothing' matches none"),
    ({"blocks": "stem"}, "expected None (derived from the layer names)"),
    ({"value_range": "0-1"}, "value_range: expected one of unit, 0-255, -1-1, torch, caffe"),
    ({"name": "resnet"}, "'resnet' is a built-in"),
    ({"name": "ResNet50"}, "'ResNet50' is a built-in or keras.applications model"),
    ({"name": "DenseNet121"}, "'DenseNet121' is a built-in or keras.applications model"),
    ({"name": "has space"}, "expected a name of letters"),
])
def test_bad_registrations_are_one_line_errors(kwargs, expected):
    name = kwargs.pop("name", "bad")
    with pytest.raises(ConfigError, match=None) as e:
        kt.register_backbone(name, user_model(), **kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_layers_keras_named_before_any_named_one_form_a_stem_block():
    """InceptionV3's way: the first convolutions keep Keras' own names (conv2d, conv2d_1); they form block
    `stem`, and the layers named after a block follow."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(8, 3, padding="same", name="mixed1_conv")(x)
    x = layers.Conv2D(8, 3, padding="same")(x)  # a Keras name inside mixed1: stays in mixed1
    model = keras.Model(inputs, x, name="inceptionish")
    spec = kt.register_backbone("inceptionish", model)
    assert spec.blocks == ("stem", "mixed1")
    assert list(spec.layer_blocks(model).values()) == ["stem", "stem", "stem", "mixed1", "mixed1"]


def test_a_model_without_a_fixed_square_input_is_refused():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, layers.Conv2D(4, 3, name="c1")(inputs))
    with pytest.raises(ConfigError, match=r"fixed square input \(S, S, C\).*\(None, None, 3\)"):
        kt.register_backbone("free", model)


def test_finetune_starts_from_the_users_weights_on_arrays_and_writes_a_run(tmp_path):
    mine = user_model()
    rng = np.random.default_rng(1)
    mine.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") + (1.0 if "variance" in v.path else 0.0)
                      for w, v in zip(mine.get_weights(), mine.weights)])
    kt.register_backbone("mine_ft", mine)
    x = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    out = str(tmp_path / "run")
    results = kt.finetune("mine_ft", (x, y, ["a", "b", "c"]), out, strategies=["linear", "full"], verbose=False,
                          data={"per_class": 8, "val": 6, "batch_size": 8, "augment": "none"},
                          finetune={"epochs": 2}, transfer={"backbone_lr": 0.1, "baselines": []})
    assert set(results) == {"linear", "full"} and all(0 <= r["accuracy"] <= 1 for r in results.values())
    for f in ("backbone.weights.h5", "target.npz", "config.yaml", "summary.json", "report.md"):
        assert os.path.exists(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "pretrain"))
    from keras_transfer.io import load_model

    linear = load_model(os.path.join(out, "strategies", "linear", "model.keras")).get_layer("backbone")
    for layer in (layer for layer in mine.layers if layer.weights):  # exactly the user's weights, frozen
        for a, b in zip(layer.get_weights(), linear.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    full = json.load(open(os.path.join(out, "strategies", "full", "metrics.json")))
    assert full["backbone_lr"] == 0.1  # discriminative learning rates reach the run
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["source"] == "backbone.weights.h5"


def test_finetune_refuses_bad_arrays_and_leaves_nothing(tmp_path):
    kt.register_backbone("mine_bad", user_model())
    out = str(tmp_path / "runs" / "run")
    with pytest.raises(ConfigError, match=r"expected uint8 images .* Received: x float64"):
        kt.finetune("mine_bad", (np.zeros((4, 8, 8, 3)), np.zeros(4, int)), out, verbose=False)
    assert not os.path.exists(tmp_path / "runs")
    with pytest.raises(ConfigError, match="expected configuration sections"):
        kt.finetune("mine_bad", "digits", out, verbose=False, trainer={"epochs": 1})
    x = np.zeros((6, 8, 8, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"integer labels >= 0. .* from -1"):
        kt.finetune("mine_bad", (x, np.array([0, 1, 2, 0, 1, -1])), out, verbose=False)
    with pytest.raises(ConfigError, match="expected a class name for every label 0..2. Received: 2 class names"):
        kt.finetune("mine_bad", (x, np.array([0, 1, 2, 0, 1, 2]), ["a", "b"]), out, verbose=False)
    from keras_transfer.errors import KTransferError

    with pytest.raises(KTransferError):  # found inside the run (too few images for 20 per class): still nothing left
        kt.finetune("mine_bad", (x, np.array([0, 1, 2, 0, 1, 2])), out, verbose=False)
    assert not os.path.exists(tmp_path / "runs")


def test_importing_the_package_does_not_import_keras(tmp_path):
    python_prints_ok("import sys, keras_transfer as kt\nassert 'keras' not in sys.modules\n"
                     "assert callable(kt.finetune) and 'keras' in sys.modules\nprint('ok')",
                     keras.config.backend(), str(tmp_path))


def test_the_readme_python_quickstart_runs_as_printed(tmp_path):
    """The README's quickstart, pasted into a fresh interpreter (it sets KERAS_BACKEND=jax unless set)."""
    if keras.config.backend() != "jax":
        pytest.skip("the quickstart runs once, on the backend it names (the API is tested on every backend above)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    section = readme[readme.index("## From Python"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", 10)]
    python_prints_ok(code + "\nassert set(results) == {'scratch', 'linear', 'partial', 'full'}\n"
                     "assert os.path.exists('runs/my_cnn/report.md')\nprint('ok')", "jax", str(tmp_path))
