import os

import keras
import numpy as np
import pytest

from keras_transfer.errors import ConfigError
from keras_transfer.models import copy_backbone, create_backbone, get_spec, list_models


def test_registry_lists_the_models():
    assert {"resnet", "efficientnet_b0", "mobilenet_v2", "resnet50"} <= set(list_models())
    with pytest.raises(ConfigError, match="Unknown model.*Received: 'vgg'"):
        get_spec("vgg")


def test_seed_resnet_has_the_seed_parameter_count():
    from keras_transfer.models import build_classifier

    bb = create_backbone("resnet", 32, 3)
    model = build_classifier(bb, "resnet", (32, 32, 3), 10, head_hidden=256)
    assert model.count_params() - 2 * 3 == 1_296_074 - 6  # 1.29 M as in the CIFAR-10 seed
    spec = get_spec("resnet")
    blocks = set(spec.layer_blocks(bb).values())
    assert blocks == set(spec.blocks)


@pytest.mark.parametrize("name", ["resnet", "efficientnet_b0", "mobilenet_v2", "resnet50", "vgg16", "airbench"])
def test_every_model_builds_and_maps_layers_to_blocks(name):
    spec = get_spec(name)
    bb = create_backbone(name, 32)
    assert bb.output.shape[0] is None and len(bb.output.shape) == 2
    assigned = spec.layer_blocks(bb)
    assert set(assigned.values()) == set(spec.blocks), "every block owns at least one layer"
    assert bb.get_layer(spec.gradcam_layer) is not None
    # Every block owns trainable weights, so partial (the last k blocks) and each gradual phase train
    # more than the linear probe (airbench's weightless "pool" block made its partial a linear probe).
    owned = {b: 0 for b in spec.blocks}
    for layer in bb.layers:
        owned[assigned[layer.name]] += sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    assert min(owned.values()) > 0, owned


def test_efficientnet_builds_at_224():
    bb = create_backbone("efficientnet_b0", 224)
    assert bb.input.shape[1:] == (224, 224, 3) and bb.output.shape[-1] == 1280
    with pytest.raises(ConfigError, match="at least 32"):
        create_backbone("efficientnet_b0", 16)


def test_imagenet_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty weights cache
    import keras.src.utils.file_utils as fu

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fu.urllib.request, "urlretrieve", offline)
    with pytest.raises(ConfigError) as e:
        create_backbone("efficientnet_b0", 32, weights="imagenet")
    assert "efficientnetb0_notop.h5" in str(e.value) and "--weights PATH" in str(e.value)


def test_local_weights_file_loads(tmp_path):
    src = create_backbone("efficientnet_b0", 32)
    path = str(tmp_path / "effnet.weights.h5")
    src.save_weights(path)
    loaded = create_backbone("efficientnet_b0", 32, weights=path)
    for a, b in zip(src.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("efficientnet_b0", 32, weights=str(tmp_path / "missing.h5"))


def test_channel_averaged_conv_on_grey_equals_rgb_conv_on_repeated_grey():
    rgb = create_backbone("resnet", 8, 3, widths=(4, 8, 8))
    grey = copy_backbone(rgb, channels=1)
    assert grey.input.shape[-1] == 1
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    conv_rgb = keras.Model(rgb.input, rgb.get_layer("stem_conv").output)
    conv_grey = keras.Model(grey.input, grey.get_layer("stem_conv").output)
    np.testing.assert_allclose(conv_grey.predict(x, verbose=0),
                               conv_rgb.predict(np.repeat(x, 3, -1), verbose=0), rtol=1e-4, atol=1e-5)
    # all other weights are copied unchanged
    np.testing.assert_array_equal(grey.get_layer("stage3_block1_2_conv").get_weights()[0],
                                  rgb.get_layer("stage3_block1_2_conv").get_weights()[0])


def test_residual_knobs():
    bb = create_backbone("resnet", 16, 1, widths=(8, 16), blocks_per_stage=2, batch_norm=False, dropout=0.0,
                         pooling="flatten")
    names = {layer.name for layer in bb.layers}
    assert "stage2_block2_out" in names and not any("bn" in n or "drop" in n for n in names)
    assert bb.output.shape[-1] == 8 * 8 * 16
    assert os.environ.get("KERAS_BACKEND") == keras.config.backend()


@pytest.mark.slow  # torch.compile: ~30 s per model on 2 cores
@pytest.mark.parametrize("name,size,options", [("resnet", 8, {}), ("airbench", 16, {"bn_bias_lr": 64.0})],
                         ids=["resnet", "airbench"])
def test_networks_train_under_jit_compile(name, size, options):
    """``jit_compile=True`` (XLA; torch.compile, where the fast layers fall back to Keras' ops) runs
    train steps, through direct layer calls as `compile_model` sets them up. On torch, dropout's graph
    breaks plus a second batch size make Dynamo retrace with symbolic sizes, which broke Inductor on
    the fast layers' channels-last views; airbench's BatchNorm-bias scale was a numpy scalar, which
    Dynamo traced as an array and failed on (`experiments/cifar10_fast.yaml` crashed on torch)."""
    from keras_transfer.accel.graph import use_direct_calls

    keras.utils.set_random_seed(0)
    backbone = create_backbone(name, size, 3, widths=(4, 8, 8), **options)
    model = use_direct_calls(keras.Model(backbone.input, keras.layers.Dense(3)(backbone.output)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, size, size, 3)).astype("float32"), rng.integers(0, 3, 6)
    moving = [w for w in model.weights if w.trainable or "moving" in w.path]  # airbench's whitening is frozen
    before = [keras.ops.convert_to_numpy(w).copy() for w in moving]
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # batches of 4, then 2
    assert np.isfinite(history.history["loss"][0])
    unchanged = [w.path for b, w in zip(before, moving) if np.allclose(b, keras.ops.convert_to_numpy(w))]
    assert unchanged == []  # kernels, BN parameters and BN statistics all moved


def test_a_frozen_spatial_dropout_stays_frozen_through_save_and_load(tmp_path):
    """A checkpoint restored a frozen block's dropout as trainable, so a resumed partial stage dropped out
    inside its frozen blocks (0.4453 instead of 0.4917 on the main job's partial, resumed at epoch 3)."""
    from keras_transfer.io import load_model
    from keras_transfer.models.resnet import FreezableSpatialDropout2D

    inputs = keras.Input((4, 4, 3))
    drop = FreezableSpatialDropout2D(0.5, seed=1, name="drop")
    model = keras.Model(inputs, drop(inputs))
    drop.trainable = False
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = load_model(path).get_layer("drop")
    assert loaded.trainable is False
    x = np.ones((2, 4, 4, 3), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=True)), x)  # frozen: identity
    # A config saved before the fix has no "trainable": the layer loads trainable, as it did then.
    config = {k: v for k, v in drop.get_config().items() if k != "trainable"}
    assert FreezableSpatialDropout2D.from_config(config).trainable is True


def test_any_keras_applications_model_by_name_with_derived_blocks_and_its_input_contract(monkeypatch):
    """A keras.applications model the registry does not list (MobileNet v1) works by name: blocks from its layer
    names, the input contract read from its preprocess_input (-1..1), a classifier that builds and trains only its
    last block under `partial`; another spelling of a registered model is that model."""
    from keras_transfer.config import RunConfig, merge
    from keras_transfer.models import build_classifier, create_backbone, get_spec, registry
    from keras_transfer.transfer import apply_strategy

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forgotten after the test
    spec = get_spec("mobilenet")
    assert spec.value_range == "-1-1" and spec.blocks[0] == "conv1" and spec.blocks[-1] == "conv_pw_13"
    assert spec.gradcam_layer == "conv_pw_13_relu"
    backbone = create_backbone("mobilenet", 32, 3)
    model = build_classifier(backbone, "mobilenet", (32, 32, 3), 4, head_hidden=0)
    assert model.get_layer("pre_scale").offset == -1.0
    apply_strategy(model, "mobilenet", "partial", train_last_k=1)
    bb = model.get_layer("backbone")
    assert bb.get_layer("conv_pw_13").trainable and not bb.get_layer("conv_pw_12").trainable
    assert get_spec("EfficientNetB0") is get_spec("efficientnet_b0")
    assert merge(RunConfig(), {"model": {"name": "VGG16"}}).model.name == "vgg16"
