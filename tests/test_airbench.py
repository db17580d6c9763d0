"""airbench (keras_transfer/models/airbench.py) and the fast CIFAR-10 preset around it: network, whitening init,
schedule, flip TTA, preset file."""

import os

import keras
import numpy as np
import pytest

from keras_transfer import config as config_lib
from keras_transfer.models import build_classifier, create_backbone, initialise_from_data
from keras_transfer.models.airbench import PartialDirac, patches_2x2
from tests.conftest import tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_airbench_has_airbench94s_shape_and_size():
    bb = create_backbone("airbench", 32, 3)
    assert bb.output.shape[-1] == 256
    names = [layer.name for layer in bb.layers]
    assert names.index("whiten_conv") < names.index("group1_conv1") < names.index("group3_conv2")
    # whiten 2x2x3x24 (frozen) + its bias (+ held copy and gate); six 3x3 convs without bias;
    # BN: beta + moving mean and var
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256)
    assert bb.count_params() == 288 + 24 + 25 + convs + 3 * (2 * 64 + 4 * 256) == 1_971_409
    assert not bb.get_layer("whiten_conv").trainable


def test_whitening_init_decorrelates_training_patches():
    rng = np.random.default_rng(0)
    # Correlated channels and pixels, as in natural images.
    base = rng.normal(size=(64, 17, 17, 1))
    x = np.concatenate([base, 0.8 * base + 0.2 * rng.normal(size=base.shape), rng.normal(size=base.shape)], -1)
    x = (x[:, 1:] + x[:, :-1])[:, :, 1:] + (x[:, 1:] + x[:, :-1])[:, :, :-1]
    bb = create_backbone("airbench", 16, 3)
    from keras_transfer.models.airbench import init_whitening

    init_whitening(bb, x, eps=0.0)
    kernel = keras.ops.convert_to_numpy(bb.get_layer("whiten_conv").kernel).reshape(12, 24)
    out = patches_2x2(x) @ kernel[:, :12]  # the positive half of the filters
    cov = out.T @ out / len(out)
    np.testing.assert_allclose(cov, np.eye(12), atol=1e-6)
    np.testing.assert_allclose(kernel[:, 12:], -kernel[:, :12])


def test_initialise_from_data_runs_on_what_the_backbone_sees():
    x, y = tiny_data(40, shape=(16, 16, 3))
    bb = create_backbone("airbench", 16, 3, widths=(8, 8, 8))
    model = build_classifier(bb, "airbench", (16, 16, 3), 10, mean=[0.5] * 3, std=[0.25] * 3, head_hidden=0)
    before = keras.ops.convert_to_numpy(bb.get_layer("whiten_conv").kernel).copy()
    initialise_from_data(model, "airbench", x)
    after = keras.ops.convert_to_numpy(bb.get_layer("whiten_conv").kernel)
    assert not np.allclose(before, after)
    seen = (x / 255.0 - 0.5) / 0.25
    out = patches_2x2(seen) @ after.reshape(12, 24)[:, :12]
    assert np.abs(np.diag(out.T @ out / len(out)) - 1).max() < 0.05


def test_partial_dirac_starts_as_identity_on_the_first_filters():
    w = keras.ops.convert_to_numpy(PartialDirac(seed=1)((3, 3, 4, 6)))
    for i in range(4):
        expected = np.zeros((3, 3, 4))
        expected[1, 1, i] = 1
        np.testing.assert_array_equal(w[..., i], expected)
    assert np.abs(w[..., 4:]).max() <= 1 / np.sqrt(36) and np.abs(w[..., 4:]).min() > 0


def test_triangle_schedule_goes_up_then_down_linearly():
    from keras_transfer.optim import TriangularSchedule, learning_rate

    cfg = config_lib.TrainConfig(epochs=10, learning_rate=1.5, schedule="triangle", warmup_epochs=2.3,
                                 start_factor=0.2, end_factor=0.07)
    sched = learning_rate(cfg, 10)
    assert isinstance(sched, TriangularSchedule)
    lr = [float(keras.ops.convert_to_numpy(sched(s))) for s in (0, 23, 100, 200)]
    np.testing.assert_allclose(lr, [0.3, 1.5, 0.105, 0.105], rtol=1e-6)
    mid = float(keras.ops.convert_to_numpy(sched(61)))
    np.testing.assert_allclose(mid, 1.5 + (0.105 - 1.5) * (61 - 23) / 77, rtol=1e-6)
    restored = TriangularSchedule.from_config(sched.get_config())
    assert float(keras.ops.convert_to_numpy(restored(23))) == pytest.approx(1.5)


def test_flip_tta_averages_the_logits_of_image_and_mirror():
    from keras_transfer.evaluate import evaluate_model, predict_logits, softmax
    from tests.conftest import tiny_model

    model = tiny_model()
    x, y = tiny_data(12)
    _, probs = evaluate_model(model, x, y, [str(i) for i in range(10)], tta="flip")
    expected = softmax((predict_logits(model, x) + predict_logits(model, x[:, :, ::-1])) / 2)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    from keras_transfer.errors import ConfigError

    with pytest.raises(ConfigError, match="expected one of none, flip, flip_translate. Received: 'crop'"):
        evaluate_model(model, x, y, [str(i) for i in range(10)], tta="crop")


def test_flip_translate_tta_is_airbench_multicrop():
    from keras_transfer.evaluate import evaluate_model, predict_logits, softmax
    from tests.conftest import tiny_model

    model = tiny_model()
    x, y = tiny_data(12)
    _, probs = evaluate_model(model, x, y, [str(i) for i in range(10)], tta="flip_translate")

    def flip(v):
        return (predict_logits(model, v) + predict_logits(model, v[:, :, ::-1])) / 2

    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :h, :w], padded[:, 2:, 2:]
    assert np.array_equal(up_left[:, 1:, 1:], x[:, :-1, :-1])  # content moved one pixel down-right
    expected = softmax(0.5 * flip(x) + 0.25 * flip(up_left) + 0.25 * flip(down_right))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_fast_preset_file_resolves_to_the_airbench_recipe():
    cfg = config_lib.load(os.path.join(ROOT, "experiments", "cifar10_fast.yaml"))
    assert cfg.model.name == "airbench" and cfg.data.source == "cifar10" and cfg.data.val == 0
    assert cfg.pretrain.schedule == "triangle" and cfg.pretrain.precision == "mixed_bfloat16"
    assert cfg.data.augment == "translate" and cfg.data.flips == "alternate" and cfg.data.tta == "flip_translate"
    assert cfg.pretrain.whiten_bias_epochs == 3
    # airbench94's coupled decay (0.0153 per 1024 examples, through momentum 0.85) as Keras' decoupled wd
    lr, momentum = cfg.pretrain.learning_rate, cfg.pretrain.momentum
    per_step = 0.0153 * 1024 / (1024 * (1 + 1 / (1 - momentum))) / (1 - momentum)
    assert cfg.pretrain.weight_decay == pytest.approx(per_step / lr, rel=1e-3)
    assert cfg.pretrain.lookahead_every == 5 and cfg.model.bn_bias_lr == 64.0


def test_fast_recipe_pretrains_end_to_end_on_tiny_data(tmp_path, digits_npz):
    import json

    import yaml
    from click.testing import CliRunner

    from keras_transfer.cli import main

    preset = yaml.safe_load(open(os.path.join(ROOT, "experiments", "cifar10_fast.yaml")))
    preset["data"].update(source=f"npz:{digits_npz}", batch_size=64, drop_last=True)
    preset["model"].update(input_size=16, channels=1, widths=[8, 8, 8])
    preset["pretrain"].update(epochs=3, warmup_epochs=0.5, precision="float32",
                              jit_compile=keras.config.backend() != "torch")
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(preset))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["pretrain", "--config", str(path), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.load(open(out / "metrics.json"))
    assert m["model"] == "airbench" and 0.0 <= m["accuracy"] <= 1.0
    assert m["first_epoch_s"] > 0 and m["train_s_without_compile"] > 0
    assert m["compile_s_estimate"] == pytest.approx(max(0.0, m["first_epoch_s"] - m["epoch_s_median"]))
    assert "training without compilation" in r.output
    model = keras.saving.load_model(out / "model.keras")
    assert not model.get_layer("backbone").get_layer("whiten_conv").trainable
    # drop_last: full batches only, as airbench94 (400 digits, 40 of them test: 360 // 64 = 5 steps per
    # epoch, not 6)
    assert int(model.optimizer.iterations) == 3 * 5


def test_bias_lr_scale_trains_the_bias_that_much_faster():
    from keras_transfer.models.airbench import Bias

    def bias_step(scale):
        inputs = keras.Input((4,))
        model = keras.Model(inputs, Bias(scale)(inputs))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        x, y = np.zeros((8, 4), "float32"), np.ones((8, 4), "float32")
        model.train_on_batch(x, y)
        return keras.ops.convert_to_numpy(model.predict(x[:1], verbose=0))[0]  # the applied bias

    np.testing.assert_allclose(bias_step(64.0), 64 * bias_step(1.0), rtol=1e-5)
    with pytest.raises(ValueError, match="lr_scale: expected a positive number. Received: 0"):
        Bias(0)


def test_airbench_batchnorm_biases_get_the_configured_multiplier():
    bb = create_backbone("airbench", 16, 3, widths=(8, 8, 8), bn_bias_lr=16.0)
    biases = [layer for layer in bb.layers if layer.name.endswith("_bias") and layer.name.startswith("group")]
    assert len(biases) == 6 and all(b.lr_scale == 16.0 for b in biases)
    assert all(not bb.get_layer(b.name[:-5]).center for b in biases)
    clone = keras.Model.from_config(bb.get_config())
    assert clone.get_layer("group2_bn1_bias").lr_scale == 16.0


def test_airbench_batchnorm_keeps_six_tenths_of_its_statistics_per_step():
    # airbench94's BatchNorm(momentum=0.6) hands torch momentum=0.4: running = 0.6 running + 0.4 batch.
    bb = create_backbone("airbench", 16, 3, widths=(8, 8, 8))
    probe = keras.Model(bb.input, bb.get_layer("group1_pool").output)
    x = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype("float32")
    batch_mean = keras.ops.convert_to_numpy(probe(x)).mean(axis=(0, 1, 2))
    bn = bb.get_layer("group1_bn1")
    bn.moving_mean.assign(np.ones(8, "float32"))
    bb(x, training=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), 0.6 + 0.4 * batch_mean, rtol=1e-4,
                               atol=1e-5)


def test_whitening_bias_is_held_after_its_epochs_and_trains_again_after_fit(tmp_path):
    from keras_transfer.config import TrainConfig
    from keras_transfer.data.pipeline import make_input
    from keras_transfer.train import compile_model, fit

    x, y = tiny_data(32, shape=(16, 16, 3))
    bb = create_backbone("airbench", 16, 3, widths=(8, 8, 8))
    model = build_classifier(bb, "airbench", (16, 16, 3), 10, mean=[127.0] * 3, std=[64.0] * 3, head_hidden=0)
    initialise_from_data(model, "airbench", x)
    layer = bb.get_layer("whiten_bias")
    applied, gates, raw = [], [], []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            applied.append(keras.ops.convert_to_numpy(layer(keras.ops.zeros((1, 1, 1, 24))))[0, 0, 0].copy())
            gates.append(float(keras.ops.convert_to_numpy(layer.gate)))
            raw.append(keras.ops.convert_to_numpy(layer.bias).copy())

    cfg = TrainConfig(epochs=3, optimizer="sgd", learning_rate=0.5, momentum=0.9, weight_decay=0.01,
                      schedule="constant", whiten_bias_epochs=1)
    compile_model(model, cfg, 4)
    conv_before = keras.ops.convert_to_numpy(bb.get_layer("group1_conv1").kernel).copy()
    fit(model, make_input(x, y, 8, True, 0), None, cfg, str(tmp_path / "freeze"), extra_callbacks=[Record()])
    assert gates == [1.0, 0.0, 0.0]
    assert np.abs(applied[0]).max() > 0  # it trained in epoch 0 ...
    np.testing.assert_array_equal(applied[1], applied[0])  # ... and was held in epochs 1 and 2,
    np.testing.assert_array_equal(applied[2], applied[0])
    assert np.abs(raw[2] - applied[0]).max() > 0  # although decay and momentum still moved the variable
    conv_after = keras.ops.convert_to_numpy(bb.get_layer("group1_conv1").kernel)
    assert np.abs(conv_after - conv_before).max() > 0  # while the rest trained
    # After fit it trains again, holding the value it was frozen at.
    assert float(keras.ops.convert_to_numpy(layer.gate)) == 1.0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.bias), applied[2], rtol=1e-6)


def test_freeze_needs_an_airbench_model():
    with pytest.raises(config_lib.ConfigError, match="whiten_bias_epochs: expected model.name airbench"):
        config_lib.merge(config_lib.RunConfig(), {"pretrain": {"whiten_bias_epochs": 3}})
    with pytest.raises(config_lib.ConfigError, match="whiten_bias_epochs: expected null or an integer >= 0"):
        config_lib.TrainConfig(whiten_bias_epochs=-1)
