"""The fine-tuning methods beyond freezing (keras_transfer.methods), on every backend: what they freeze stays
bit-identical, their penalties equal their closed forms and reach the training loss, LP-FT's fine-tuning starts
from its probe's head."""

import json
import os

import keras
import numpy as np
import pytest

from keras_transfer.config import TrainConfig
from keras_transfer.errors import ConfigError
from keras_transfer.methods import (
    BatchSpectralShrinkage,
    attach_l2sp,
    check_surgical_block,
    l2sp_penalty,
    pretrained_values,
)
from keras_transfer.models import get_spec
from keras_transfer.train import compile_model
from keras_transfer.transfer import apply_strategy, parameter_counts
from tests.conftest import tiny_data, tiny_model


def values(model):
    """``{layer/variable: array}`` of the backbone's weights (trainable and not)."""
    bb = model.get_layer("backbone")
    return {f"{layer.name}/{v.name}": np.array(keras.ops.convert_to_numpy(v.value))
            for layer in bb.layers for v in layer.weights}


def one_epoch(model, lr=0.5):
    compile_model(model, TrainConfig(epochs=1, optimizer="sgd", learning_rate=lr, weight_decay=0.0,
                                     schedule="constant"), 2)
    x, y = tiny_data(16)
    return model.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"][-1]


def _size(model, predicate):
    bb = model.get_layer("backbone")
    return sum(int(np.prod(v.shape)) for layer in bb.layers for v in layer.weights if predicate(layer, v))


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


@pytest.mark.parametrize("strategy,trains", [
    ("bitfit", lambda layer, v: v.name == "bias" or _is_bn(layer) and v.name == "beta"),
    ("norm-only", lambda layer, v: _is_bn(layer) and v.name in ("gamma", "beta")),
])
def test_bias_and_norm_only_tuning_move_only_their_variables(strategy, trains):
    model = tiny_model()
    apply_strategy(model, "resnet", strategy)
    head = sum(int(np.prod(v.shape)) for name in ("head_dense", "head_logits")
               for v in model.get_layer(name).weights)
    trainable, _ = parameter_counts(model)
    assert trainable == head + _size(model, trains)  # the head and the method's variables, nothing else
    before = values(model)
    one_epoch(model)
    after = values(model)
    bb = model.get_layer("backbone")
    moved = 0
    for layer in bb.layers:
        for v in layer.weights:
            key = f"{layer.name}/{v.name}"
            if trains(layer, v):
                moved += not np.array_equal(before[key], after[key])
            elif "moving" in v.name:  # BatchNorm runs in training mode: its statistics follow the target
                assert not np.array_equal(before[key], after[key]), key
            else:
                np.testing.assert_array_equal(before[key], after[key], err_msg=f"{key} moved under {strategy}")
    assert moved > 0


def test_norm_only_trains_the_shift_a_batchnorm_layer_keeps_apart():
    """airbench's BatchNorm has no shift of its own (center=False): its ``groupI_bnJ_bias`` layer holds it, and
    norm-only trains those (and bitfit too), not only the head."""
    from keras_transfer.models import build_classifier, create_backbone

    bb = create_backbone("airbench", 16, 3, widths=(4, 8, 8))
    shifts = [layer for layer in bb.layers if layer.name.endswith("_bias") and "_bn" in layer.name]
    assert len(shifts) == 6
    shift_size = sum(int(np.prod(v.shape)) for layer in shifts for v in layer.weights)
    counts = {}
    for strategy in ("linear", "norm-only", "bitfit"):
        model = build_classifier(create_backbone("airbench", 16, 3, widths=(4, 8, 8)), "airbench", (16, 16, 3),
                                 10, head_hidden=8)
        apply_strategy(model, "airbench", strategy)
        counts[strategy] = parameter_counts(model)[0]
        if strategy == "norm-only":
            before = {layer.name: np.array(keras.ops.convert_to_numpy(layer.weights[0]))
                      for layer in model.get_layer("backbone").layers if layer.name in {s.name for s in shifts}}
            compile_model(model, TrainConfig(epochs=1, optimizer="sgd", learning_rate=0.5, weight_decay=0.0,
                                             schedule="constant"), 2)
            x, y = tiny_data(16, (16, 16, 3))
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
            moved = [n for n, b in before.items() if not np.array_equal(
                b, keras.ops.convert_to_numpy(model.get_layer("backbone").get_layer(n).weights[0]))]
            assert moved, "no BatchNorm shift moved under norm-only"
    assert counts["norm-only"] == counts["linear"] + shift_size
    assert counts["bitfit"] >= counts["norm-only"]  # the whitening bias is a bias too


@pytest.mark.parametrize("position,block", [("first", "stem"), ("middle", "stage2_block1"),
                                            ("last", "stage3_block1"), ("stage1_block1", "stage1_block1")])
def test_surgical_trains_one_block_and_keeps_the_others_bit_identical(position, block):
    model = tiny_model()
    spec = get_spec("resnet")
    assert check_surgical_block(spec.blocks, position) == block
    apply_strategy(model, "resnet", "surgical", surgical_block=position)
    blocks = spec.layer_blocks(model.get_layer("backbone"))
    before = values(model)
    one_epoch(model)
    after = values(model)
    moved = [k for k in before if not np.array_equal(before[k], after[k]) and blocks[k.split("/")[0]] != block]
    assert moved == []
    assert any(not np.array_equal(before[k], after[k]) for k in before if blocks[k.split("/")[0]] == block)
    head = sum(int(np.prod(v.shape)) for name in ("head_dense", "head_logits") for v in model.get_layer(name).weights)
    in_block = _size(model, lambda layer, v: blocks[layer.name] == block and v.trainable)
    assert parameter_counts(model)[0] == head + in_block


def test_surgical_block_must_name_a_block():
    with pytest.raises(ConfigError, match="surgical_block: expected one of first, middle, last"):
        check_surgical_block(get_spec("resnet").blocks, "stage9")
    from keras_transfer.config import RunConfig, merge

    with pytest.raises(ConfigError, match="Received: 'top'"):
        merge(RunConfig(), {"transfer": {"surgical_block": "top"}})


def test_l2sp_penalty_is_its_closed_form_zero_at_the_pretrained_weights():
    model = tiny_model()
    backbone = model.get_layer("backbone")
    w0 = pretrained_values(backbone)
    apply_strategy(model, "resnet", "l2sp")
    attach_l2sp(model, w0, alpha=0.3, beta=0.0)
    assert l2sp_penalty(model) == 0.0  # at w0, and no head term
    rng = np.random.default_rng(0)
    expected = 0.0
    for layer in backbone.layers:
        for v in layer.trainable_weights:
            delta = rng.normal(0, 0.1, v.shape).astype("float32")
            v.assign(keras.ops.convert_to_numpy(v.value) + delta)
            expected += 0.3 * float(np.sum(np.square((w0[f"{layer.name}/{v.name}"] + delta)
                                                     - w0[f"{layer.name}/{v.name}"])))
    attach_l2sp(model, w0, alpha=0.3, beta=0.05)
    kernels = [model.get_layer(n).kernel for n in ("head_dense", "head_logits")]
    expected += 0.05 * sum(float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels)
    assert l2sp_penalty(model) == pytest.approx(expected, rel=1e-4)
    # what Keras adds to the training loss is exactly these terms
    added = sum(keras.ops.convert_to_numpy(keras.ops.stop_gradient(x)) for x in model.losses)
    assert float(added) == pytest.approx(expected, rel=1e-4)


def test_l2sp_pulls_the_backbone_back_toward_the_pretrained_weights_in_training():
    model = tiny_model()
    backbone = model.get_layer("backbone")
    w0 = pretrained_values(backbone)
    for layer in backbone.layers:
        for v in layer.trainable_weights:
            v.assign(keras.ops.convert_to_numpy(v.value) + 0.5)
    apply_strategy(model, "resnet", "l2sp")

    def distance():
        return sum(float(np.sum(np.square(keras.ops.convert_to_numpy(v.value) - w0[f"{layer.name}/{v.name}"])))
                   for layer in backbone.layers for v in layer.trainable_weights)

    start = distance()
    attach_l2sp(model, w0, alpha=10.0, beta=0.0)
    one_epoch(model, lr=0.01)  # two SGD steps: each shrinks w - w0 by 2 * lr * alpha = 20%, beside CE's pull
    assert distance() < 0.75 * start


def test_batch_spectral_shrinkage_adds_the_smallest_squared_singular_values_in_training_only():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    layer = BatchSpectralShrinkage(eta=0.5, k=2, name="head_bss")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    assert layer.losses == []
    layer(x, training=True)
    s = np.linalg.svd(x, compute_uv=False)
    added = keras.ops.convert_to_numpy(keras.ops.stop_gradient(layer.losses[0]))
    assert float(added) == pytest.approx(0.5 * np.sum(s[-2:] ** 2), rel=1e-4)


def test_a_model_with_batch_spectral_shrinkage_trains_and_saves(tmp_path):
    from keras_transfer.io import load_model, save_model
    from keras_transfer.models import build_classifier, create_backbone

    backbone = create_backbone("resnet", 8, 1, widths=(4, 8, 8))
    model = build_classifier(backbone, "resnet", (8, 8, 1), 10, head_hidden=8,
                             feature_penalty=BatchSpectralShrinkage(1.0, 1, name="head_bss"))
    apply_strategy(model, "resnet", "bss")
    loss = one_epoch(model, lr=0.05)  # the SVD's gradient exists on this backend
    assert np.isfinite(loss)
    path = str(tmp_path / "m.keras")
    save_model(model, path)
    x, _ = tiny_data(4)
    np.testing.assert_allclose(load_model(path).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_lp_ft_fine_tunes_from_its_probe_head_exactly(tmp_path, digits_npz, monkeypatch):
    """The second phase's model enters training with the head the probe ended with (its last checkpoint)."""
    from keras_transfer import config as config_lib
    from keras_transfer import runner
    from keras_transfer.io import load_model

    seen = {}
    real = runner.train_stage

    def spy(model, *args, **kwargs):
        seen["head"] = [np.array(keras.ops.convert_to_numpy(w)) for n in ("head_dense", "head_logits")
                        for w in model.get_layer(n).weights]
        seen["trainable"] = parameter_counts(model)[0]
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runner, "train_stage", spy)
    cfg = config_lib.merge(config_lib.RunConfig(), {
        "data": {"source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}", "per_class": 5, "augment": "none",
                 "batch_size": 16},
        "model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "transfer": {"strategies": ["lp-ft"], "lp_epochs": 3, "baselines": []}})
    run_dir = str(tmp_path / "run")
    results = runner.finetune(cfg, run_dir, preview=False)
    stage = os.path.join(run_dir, "strategies", "lp-ft")
    probe = load_model(os.path.join(stage, "probe", "checkpoints", "last.keras"))
    probe_head = [np.array(keras.ops.convert_to_numpy(w)) for n in ("head_dense", "head_logits")
                  for w in probe.get_layer(n).weights]
    for a, b in zip(seen["head"], probe_head):
        np.testing.assert_array_equal(a, b)
    assert len(open(os.path.join(stage, "probe", "history.csv")).read().splitlines()) == 1 + 3
    r = results["lp-ft"]
    assert seen["trainable"] == r["trainable_params"] > 0 and r["probe_wall_time"] > 0
    assert json.load(open(os.path.join(stage, "metrics.json")))["strategy"] == "lp-ft"


def test_an_interrupted_l2sp_resumes_with_its_penalty_and_bitfit_starts_again(tmp_path, digits_npz, monkeypatch):
    """A checkpoint keeps neither L2-SP's regularizers (attached again to the resumed model) nor bitfit's frozen
    variables (the stage starts again from its first epoch, to the same result as an uninterrupted run)."""
    from keras_transfer import config as config_lib
    from keras_transfer import runner

    cfg = config_lib.merge(config_lib.RunConfig(), {
        "data": {"source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}", "per_class": 5, "augment": "none",
                 "batch_size": 16},
        "model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 2},
        "transfer": {"strategies": ["l2sp", "bitfit"], "baselines": []}})
    first = runner.finetune(cfg, str(tmp_path / "whole"), preview=False)
    # Interrupted after epoch 1 of 2: a run of the same configuration stopped there, its results removed.
    run_dir = str(tmp_path / "run")
    runner.finetune(config_lib.merge(cfg, {"finetune": {"epochs": 1}}), run_dir, preview=False)
    for s in ("l2sp", "bitfit"):
        os.remove(os.path.join(run_dir, "strategies", s, "metrics.json"))
    attached, said = [], []
    real = runner.attach_l2sp
    monkeypatch.setattr(runner, "attach_l2sp", lambda m, *a: attached.append(m) or real(m, *a))
    again = runner.finetune(cfg, run_dir, echo=said.append, resume=True, preview=False)
    assert any("resuming" in line and "l2sp" in line for line in said)
    assert any("bitfit" in line and "restarts from its first epoch" in line for line in said)
    assert len(attached) == 1 and any(v.regularizer is not None for v in attached[0].trainable_weights)
    assert again["bitfit"]["accuracy"] == first["bitfit"]["accuracy"]
    assert again["bitfit"]["trainable_params"] == first["bitfit"]["trainable_params"]
    assert len(open(os.path.join(run_dir, "strategies", "l2sp", "history.csv")).read().splitlines()) == 3
