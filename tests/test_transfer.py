import keras
import numpy as np
import pytest

from keras_transfer.config import TrainConfig
from keras_transfer.train import compile_model
from keras_transfer.transfer import (
    apply_strategy,
    gradual_schedule,
    learning_rate_multipliers,
    parameter_counts,
    set_trainable_blocks,
    trainable_blocks,
)
from tests.conftest import tiny_data, tiny_model


def snapshot(model):
    bb = model.get_layer("backbone")
    return {f"{layer.name}/{v.path}": keras.ops.convert_to_numpy(v).copy()
            for layer in bb.layers for v in layer.weights}


def train_step(model):
    compile_model(model, TrainConfig(epochs=1, optimizer="sgd", learning_rate=0.5, weight_decay=0.0,
                                     schedule="constant"), 2)
    x, y = tiny_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("strategy,frozen_blocks", [
    ("linear", {"stem", "stage1_block1", "stage2_block1", "stage3_block1"}),
    ("partial", {"stem", "stage1_block1", "stage2_block1"}),
])
def test_frozen_weights_and_bn_statistics_do_not_move(strategy, frozen_blocks):
    from keras_transfer.models import get_spec

    model = tiny_model()
    apply_strategy(model, "resnet", strategy, train_last_k=1)
    before = snapshot(model)
    train_step(model)
    after = snapshot(model)
    blocks = get_spec("resnet").layer_blocks(model.get_layer("backbone"))
    moving = [k for k in before if "moving" in k]
    assert moving, "the tiny model has BatchNorm moving statistics"
    changed_trainable = 0
    for key in before:
        block = blocks[key.split("/")[0]]
        if block in frozen_blocks:
            np.testing.assert_array_equal(before[key], after[key], err_msg=f"{key} changed while frozen")
        elif not np.array_equal(before[key], after[key]):
            changed_trainable += 1
    if strategy == "partial":
        assert changed_trainable > 0, "trainable block weights should change"
    head = model.get_layer("head_logits")
    assert head.trainable


def test_trainable_parameter_counts_match_the_strategy():
    model = tiny_model()
    counts = {}
    for s in ("full", "linear", "partial"):
        apply_strategy(model, "resnet", s)
        counts[s] = parameter_counts(model)
    total = sum(counts["full"])
    assert all(sum(c) == total for c in counts.values())
    head = sum(int(np.prod(w.shape)) for name in ("head_dense", "head_logits")
               for w in model.get_layer(name).trainable_weights)
    assert counts["linear"][0] == head
    bb = model.get_layer("backbone")
    last = sum(int(np.prod(w.shape)) for layer in bb.layers if layer.name.startswith("stage3_block1")
               for w in layer.weights if "moving" not in w.path)
    assert counts["partial"][0] == head + last
    assert counts["linear"][0] < counts["partial"][0] < counts["full"][0]


def test_airbench_strategies_keep_the_whitening_conv_fixed():
    """No strategy trains airbench's whitening conv (set from the data); its bias and the groups do."""
    from keras_transfer.models import build_classifier, create_backbone

    bb = create_backbone("airbench", 16, 3, widths=(8, 16, 16))
    model = build_classifier(bb, "airbench", (8, 8, 1), 10, head_hidden=0, head_dropout=0.0)  # resized to 16
    counts = {}
    for s in ("linear", "partial", "full", "scratch"):
        apply_strategy(model, "airbench", s)
        counts[s] = parameter_counts(model)[0]
        assert not bb.get_layer("whiten_conv").trainable
    assert counts["linear"] < counts["partial"] < counts["full"] == counts["scratch"]
    assert bb.get_layer("whiten_bias").trainable
    before = snapshot(model)
    train_step(model)
    after = snapshot(model)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert not any(k.startswith("whiten_conv/") for k in moved)
    assert any(k.startswith("whiten_bias/") for k in moved) and any(k.startswith("group1_conv1/") for k in moved)


def test_linear_probe_head_standardises_the_frozen_features(tmp_path):
    """feature_statistics + build_classifier(feature_stats=): the head sees the training images' features
    at mean 0 and variance 1, trains no extra parameter, and the model saves and loads with it."""
    from keras_transfer.models import build_classifier, create_backbone
    from keras_transfer.transfer import feature_extractor, feature_statistics

    bb = create_backbone("resnet", 8, 1, widths=(4, 8, 8))
    plain = build_classifier(bb, "resnet", (8, 8, 1), 10, head_hidden=8)
    x, y = tiny_data(64)
    mean, variance = feature_statistics(feature_extractor(plain).predict(x, verbose=0))
    assert mean.shape == variance.shape == (8,) and variance.min() > 0
    model = build_classifier(bb, "resnet", (8, 8, 1), 10, head_hidden=8, feature_stats=(mean, variance))
    apply_strategy(model, "resnet", "linear")
    apply_strategy(plain, "resnet", "linear")
    assert parameter_counts(model)[0] == parameter_counts(plain)[0]
    seen = keras.Model(model.input, model.get_layer("head_norm").output).predict(x, verbose=0)
    np.testing.assert_allclose(seen.mean(0), 0.0, atol=1e-4)
    # 1 but for the variance floor (0.1% of the mean feature variance), which only lowers it
    assert np.all(seen.var(0) <= 1 + 1e-4) and np.all(seen.var(0) > 0.95), seen.var(0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_recompile_picks_up_the_new_trainable_set():
    model = tiny_model()
    apply_strategy(model, "resnet", "linear")
    train_step(model)
    n_linear = len(model.optimizer.variables)
    set_trainable_blocks(model, "resnet", {"stage3_block1"})
    before = snapshot(model)
    train_step(model)
    after = snapshot(model)
    assert len(model.optimizer.variables) > n_linear
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("stage3_block1_2_conv"))


def test_partial_by_name_and_gradual_schedule():
    assert trainable_blocks("resnet", "partial", freeze_until="stage1_block1") == {"stage2_block1", "stage3_block1"}
    phases = gradual_schedule("resnet", 2)
    assert phases == [set(), {"stage3_block1"}, {"stage2_block1", "stage3_block1"}]


def test_cached_feature_linear_probe_matches_the_ordinary_one(tmp_path):
    """Same init, same batches, no dropout: training the head on stored features is the same maths."""
    from keras_transfer.data.pipeline import make_input
    from keras_transfer.models import build_classifier, create_backbone
    from keras_transfer.runner import train_cached_linear
    from keras_transfer.train import fit

    cfg = TrainConfig(epochs=3, optimizer="sgd", learning_rate=0.1, weight_decay=0.0, schedule="constant")
    x, y = tiny_data(48)
    splits = {"train": (x[:32], y[:32]), "val": (x[32:], y[32:])}

    def fresh():
        keras.utils.set_random_seed(0)
        bb = create_backbone("resnet", 8, 1, widths=(4, 8, 8), dropout=0.0)
        m = build_classifier(bb, "resnet", (8, 8, 1), 10, head_hidden=8, head_dropout=0.0)
        apply_strategy(m, "resnet", "linear")
        return m

    ordinary = fresh()
    compile_model(ordinary, cfg, 4)
    fit(ordinary, make_input(*splits["train"], 8, True, 0, "memory"), make_input(*splits["val"], 8, False),
        cfg, str(tmp_path / "ordinary"))
    cached, _ = train_cached_linear(fresh(), splits, cfg, str(tmp_path / "cached"), 0, 8)
    for a, b in zip(ordinary.get_weights(), cached.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    xa, _ = tiny_data(8, seed=5)
    np.testing.assert_allclose(ordinary.predict(xa, verbose=0), cached.predict(xa, verbose=0), rtol=1e-3, atol=1e-4)


def test_learning_rate_multipliers_decay_by_block_below_the_head():
    """``backbone_lr * layer_decay ** d`` for the block d blocks below the head, for trainable backbone
    weights only: the head trains at the optimizer's rate, frozen blocks are not in the optimizer."""
    model = tiny_model()
    assert learning_rate_multipliers(model, "resnet") == {}
    got = learning_rate_multipliers(model, "resnet", 0.5, 0.5)
    backbone = model.get_layer("backbone")
    want = {"stem": 0.5 * 0.5 ** 4, "stage1_block1": 0.5 * 0.5 ** 3, "stage2_block1": 0.5 * 0.5 ** 2,
            "stage3_block1": 0.5 * 0.5}
    from keras_transfer.models import get_spec

    blocks = get_spec("resnet").layer_blocks(backbone)
    expected = {v.path: want[blocks[layer.name]] for layer in backbone.layers for v in layer.trainable_weights}
    assert got == expected and len(got) == len(backbone.trainable_weights)
    head = {v.path for v in model.trainable_weights} - {v.path for v in backbone.trainable_weights}
    assert head and not head & set(got)
    apply_strategy(model, "resnet", "partial", train_last_k=1)
    assert set(learning_rate_multipliers(model, "resnet", 0.5, 0.5).values()) == {0.25}
