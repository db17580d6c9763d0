import dataclasses
import os

import keras
import numpy as np
import pytest

from keras_transfer.callbacks import EpochProgress, read_history
from keras_transfer.config import TrainConfig
from keras_transfer.data.augment import augmentation_layers
from keras_transfer.data.pipeline import make_input
from keras_transfer.errors import ConfigError
from keras_transfer.optim import learning_rate
from keras_transfer.train import compile_model, fit, resume_state
from tests.conftest import tiny_data, tiny_model

CFG = TrainConfig(epochs=3, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                  label_smoothing=0.1, schedule="cosine", warmup_epochs=1)


def _run(stage_dir, epochs, seed=0):
    keras.utils.set_random_seed(seed)
    model = tiny_model(augment=augmentation_layers("mild", 1, seed=seed))
    compile_model(model, CFG, 4)
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)
    fit(model, make_input(x, y, 8, True, seed), make_input(xv, yv, 8, False), CFG, stage_dir, epochs=epochs)
    return model


def test_resume_reaches_the_same_weights(tmp_path):
    full = _run(str(tmp_path / "full"), 3)
    _run(str(tmp_path / "part"), 2)  # "interrupted" after epoch 2
    model, start = resume_state(str(tmp_path / "part"))
    assert start == 2
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)
    fit(model, make_input(x, y, 8, True, 0, initial_epoch=start), make_input(xv, yv, 8, False), CFG,
        str(tmp_path / "part"), initial_epoch=start)
    for a, b in zip(full.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    hist = read_history(str(tmp_path / "part" / "history.csv"))
    assert hist["epoch"] == [0.0, 1.0, 2.0] and "epoch_time" in hist
    # the schedule's rate where each epoch (4 steps) ends, resumed or not: warm-up to 0.05, then cosine
    schedule = learning_rate(CFG, 4)
    want = [float(keras.ops.convert_to_numpy(schedule(4 * (e + 1)))) for e in range(3)]
    np.testing.assert_allclose(hist["learning_rate"], want, rtol=1e-5)
    np.testing.assert_allclose(read_history(str(tmp_path / "full" / "history.csv"))["learning_rate"], want, rtol=1e-5)
    assert want[0] == pytest.approx(0.05) and want[0] > want[1] > want[2]
    assert os.path.exists(tmp_path / "part" / "checkpoints" / "best.keras")
    assert not [f for f in os.listdir(tmp_path / "part" / "checkpoints") if f.startswith(".tmp")]


@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_a_stage_resumed_under_the_plateau_schedule_cuts_its_rate_where_an_uninterrupted_one_does(tmp_path, strategy,
                                                                                                  monkeypatch):
    """The main job's fine-tuning schedule (plateau) on a partial stage (frozen blocks, BatchNorm in inference mode)
    and a full one: interrupted after epoch 4 of 7 and resumed, the weights, losses and learning rates equal an
    uninterrupted stage's (the plateau's waiting count and best value were lost on resume before 2026-12-07). No
    epoch counts as an improvement after the first here (min_delta), so the rate is cut after epochs 3 and 5, and
    a resume that forgot the count would cut it later."""
    from keras_transfer import train
    from keras_transfer.transfer import apply_strategy

    class Strict(train.ResumablePlateau):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "min_delta": 1e9})

    monkeypatch.setattr(train, "ResumablePlateau", Strict)
    cfg = TrainConfig(epochs=7, optimizer="adam", learning_rate=0.01, weight_decay=1e-4, schedule="plateau")
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)

    def run(stage, epochs):
        keras.utils.set_random_seed(0)
        model = tiny_model(augment=augmentation_layers("mild", 1, seed=0))
        apply_strategy(model, "resnet", strategy)
        compile_model(model, cfg, 4)
        fit(model, make_input(x, y, 8, True, 0), make_input(xv, yv, 8, False), cfg, stage, epochs=epochs)
        return model

    whole = run(str(tmp_path / "whole"), 7)
    run(str(tmp_path / "part"), 4)
    model, start = resume_state(str(tmp_path / "part"))
    fit(model, make_input(x, y, 8, True, 0, initial_epoch=start), make_input(xv, yv, 8, False), cfg,
        str(tmp_path / "part"), initial_epoch=start)
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    h1, h2 = (read_history(str(tmp_path / d / "history.csv")) for d in ("whole", "part"))
    np.testing.assert_allclose(h1["learning_rate"], h2["learning_rate"], rtol=1e-6)
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-4)
    np.testing.assert_allclose(h1["learning_rate"], [0.01] * 3 + [0.005] * 2 + [0.0025] * 2, rtol=1e-6)
    # best.keras is the same epoch's model, resumed or not (a resume used to forget the best so far)
    from keras_transfer.io import load_model

    best = [load_model(str(tmp_path / d / "checkpoints" / "best.keras")).get_weights() for d in ("whole", "part")]
    for a, b in zip(*best):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_damaged_last_checkpoint_is_one_line_naming_the_file(tmp_path):
    stage = str(tmp_path / "stage")
    _run(stage, 1)
    last = os.path.join(stage, "checkpoints", "last.keras")
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated, as a disk that filled up leaves it
    expected = r"^Cannot resume: expected a Keras model file at .*last\.keras .*damaged"
    with pytest.raises(ConfigError, match=expected) as e:
        resume_state(stage)
    assert "\n" not in str(e.value)


def test_resuming_a_history_without_a_learning_rate_column_keeps_its_columns(tmp_path):
    stage = tmp_path / "old"
    _run(str(stage), 2)
    path = stage / "history.csv"
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("learning_rate")  # as an earlier version wrote it
    path.write_text("".join(",".join(r[:drop] + r[drop + 1:]) + "\n" for r in rows))
    model, start = resume_state(str(stage))
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)
    fit(model, make_input(x, y, 8, True, 0, initial_epoch=start), make_input(xv, yv, 8, False), CFG, str(stage),
        initial_epoch=start)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and {len(line.split(",")) for line in lines} == {len(rows[0]) - 1}, lines
    assert read_history(str(path))["epoch"] == [0.0, 1.0, 2.0]


def test_steps_per_execution_trains_exactly_like_one_step_per_call(tmp_path):
    """5 steps per epoch at 4 steps per execution: the second execution of each epoch is partial.
    On TensorFlow, an endless input stream made Keras run whole executions, 8 steps per epoch."""
    if keras.config.backend() == "torch":
        with pytest.raises(ConfigError, match="steps_per_execution: expected 1 on the torch backend"):
            TrainConfig(steps_per_execution=4)
        return
    cfg = dataclasses.replace(CFG, epochs=2, schedule="triangle", lookahead_every=2)
    x, y = tiny_data(36)
    xv, yv = tiny_data(16, seed=1)
    runs = []
    for spe in (1, 4):
        keras.utils.set_random_seed(0)
        model = tiny_model(augment=augmentation_layers("mild", 1, seed=0))
        compile_model(model, dataclasses.replace(cfg, steps_per_execution=spe), 5)
        stage = str(tmp_path / f"spe{spe}")
        fit(model, make_input(x, y, 8, True, 0), make_input(xv, yv, 8, False), cfg, stage)
        assert int(model.optimizer.iterations) == 10
        runs.append((model.get_weights(), read_history(os.path.join(stage, "history.csv"))))
    (w1, h1), (w4, h4) = runs
    for a, b in zip(w1, w4):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h1[key], h4[key], rtol=1e-5)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_steps_per_execution_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="steps_per_execution: expected an integer >= 1"):
        TrainConfig(steps_per_execution=value)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="Cannot resume"):
        resume_state(str(tmp_path))


@pytest.mark.parametrize("name", ["resnet", "efficientnet_b0"])
def test_saved_model_gives_identical_predictions(tmp_path, name):
    from keras_transfer.models import build_classifier, create_backbone
    from keras_transfer.transfer import apply_strategy

    bb = create_backbone(name, 32, **({"widths": (4, 8, 8)} if name == "resnet" else {}))
    model = build_classifier(bb, name, (16, 16, 3), 4, augment=augmentation_layers("strong", 3), head_hidden=8)
    apply_strategy(model, name, "partial")
    compile_model(model, TrainConfig(epochs=1, learning_rate=1e-2), 2)
    x, y = tiny_data(8, (16, 16, 3), k=4)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # fine-tuned: BN stats moved
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)
    # the known Keras issue: a fine-tuned EfficientNet losing accuracy after save/load
    assert (loaded.predict(x, verbose=0).argmax(1) == before.argmax(1)).all()


@pytest.mark.parametrize("name", ["resnet", "airbench"])
def test_saved_model_loads_in_a_fresh_process(tmp_path, name):
    """A new process (``ktransfer finetune --pretrained``, ``evaluate``, ``gradcam``) has not built the
    backbone, so its custom layers must be registered by the loader itself."""
    import subprocess
    import sys

    from keras_transfer.models import build_classifier, create_backbone

    bb = create_backbone(name, 16, widths=(4, 8, 8))
    model = build_classifier(bb, name, (16, 16, 3), 4, augment=augmentation_layers("strong", 3), head_hidden=8)
    x, _ = tiny_data(4, (16, 16, 3), k=4)
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "p.npy", model.predict(x, verbose=0))
    code = ("import sys, numpy as np; from keras_transfer.pretrained import load_pretrained; "
            "d = sys.argv[1]; m = load_pretrained(d + '/m.keras'); "
            "np.testing.assert_allclose(m.predict(np.load(d + '/x.npy'), verbose=0), np.load(d + '/p.npy'), "
            "rtol=1e-5, atol=1e-5)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)), env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-2000:]


def test_auto_jit_is_keras_default():
    """``jit_compile: auto`` follows Keras: XLA on JAX, on TF only with an accelerator (XLA on a CPU ran
    EfficientNetB0 7-10x slower, benchmarks/results/cpu2-efficientnet_b0-224-b16.md), eager torch."""
    ours = compile_model(tiny_model(), TrainConfig(epochs=1), 2)
    plain = tiny_model()
    plain.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert ours.jit_compile == plain.jit_compile
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        assert ours.jit_compile == bool(tf.config.list_physical_devices("GPU"))
    else:
        assert ours.jit_compile is (backend == "jax")
    assert compile_model(tiny_model(), TrainConfig(epochs=1, jit_compile=False), 2).jit_compile is False


def test_precision_policy_and_optimizers():
    from keras_transfer.optim import make_optimizer, set_precision

    set_precision("mixed_bfloat16")
    model = tiny_model()
    assert model.get_layer("head_logits").compute_dtype == "float32"
    assert model.get_layer("backbone").get_layer("stem_conv").compute_dtype == "bfloat16"
    set_precision("float32")
    assert isinstance(make_optimizer(TrainConfig(optimizer="adamw"), 1), keras.optimizers.AdamW)
    with pytest.raises(ConfigError, match="Received: 'lion'"):
        make_optimizer(TrainConfig(optimizer="lion"), 1)
    with pytest.raises(ConfigError):
        set_precision("fp8")


def test_ema_ends_training_on_the_averaged_weights_and_saves(tmp_path):
    from keras_transfer.io import load_model, save_model
    from keras_transfer.optim import make_optimizer

    x, y = tiny_data(32)

    def trained(ema):
        keras.utils.set_random_seed(0)
        cfg = TrainConfig(epochs=1, optimizer="sgd", learning_rate=0.1, schedule="constant", ema_momentum=ema)
        model = compile_model(tiny_model(), cfg, 4)
        fit(model, make_input(x, y, 8, True, 0), None, cfg, str(tmp_path / f"ema{ema}"))
        return model

    averaged, last = trained(0.9), trained(0.0)
    moving = averaged.optimizer._model_variables_moving_average
    assert len(moving) == len(averaged.trainable_weights) > 0
    for w, a in zip(averaged.trainable_weights, moving):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(a), rtol=1e-6)
    assert any(not np.allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
               for a, b in zip(averaged.trainable_weights, last.trainable_weights))
    # predict, then save with the optimizer (on JAX this once failed: "Array has been deleted")
    before = averaged.predict(x, verbose=0)
    save_model(averaged, str(tmp_path / "ema.keras"))
    np.testing.assert_allclose(load_model(str(tmp_path / "ema.keras")).predict(x, verbose=0), before, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="ema_momentum: expected 0 .off. or a momentum in .0, 1.. Received: 1.0"):
        make_optimizer(TrainConfig(ema_momentum=1.0), 1)


def _dense_model():
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    return keras.Model(inputs, dense(inputs))


def test_lookahead_pulls_back_on_airbench94s_ramp():
    """Keras' fit with `Lookahead` against plain SGD steps plus the pull-backs done by hand."""
    from keras_transfer.optim import LookaheadSGD, make_optimizer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype("float32"), rng.integers(0, 3, 40)
    every, total, decay = 2, 5, 0.6
    cfg = TrainConfig(epochs=1, optimizer="sgd", learning_rate=0.5, momentum=0.8, nesterov=True, weight_decay=0.0,
                      schedule="constant", lookahead_every=every, lookahead_decay=decay, lookahead_power=3.0)
    opt = make_optimizer(cfg, total)
    assert isinstance(opt, LookaheadSGD) and opt.total_steps == total
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _dense_model()
    model.compile(opt, loss)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    ref = _dense_model()
    ref.compile(keras.optimizers.SGD(0.5, momentum=0.8, nesterov=True), loss)
    average = None
    for step in range(1, total + 1):
        ref.train_on_batch(x[(step - 1) * 8:step * 8], y[(step - 1) * 8:step * 8])
        w = ref.get_weights()
        if average is None:
            average = w
        elif step % every == 0:
            rho = decay ** every * (step / total) ** 3
            average = [rho * a + (1 - rho) * b for a, b in zip(average, w)]
            ref.set_weights(average)
    # the 5th step is not a pull-back step: training ends on the average of step 4, as airbench94's epoch end
    for a, b in zip(model.get_weights(), average):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(average[0], w[0])  # the pull-back did something

    with pytest.raises(ConfigError, match="at most one of ema_momentum and lookahead_every"):
        make_optimizer(TrainConfig(ema_momentum=0.9, lookahead_every=5), 1)
    with pytest.raises(ConfigError, match="Lookahead: expected every >= 1, 0 < decay < 1"):
        make_optimizer(TrainConfig(lookahead_every=5, lookahead_decay=1.5), 1)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_average_overwrite_matches_keras_ema_overwrite(tmp_path, name):
    """``ema_momentum`` with ``ema_overwrite_every`` (`AverageOverwrite`: a select, no host read on torch)
    trains to the weights and averages of Keras' ``ema_overwrite_frequency`` (an ``ops.cond``), and saves
    and loads."""
    from keras_transfer.io import load_model, save_model
    from keras_transfer.optim import AverageOverwrite, make_optimizer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(56, 6)).astype("float32"), rng.integers(0, 3, 56)
    cfg = TrainConfig(epochs=1, optimizer=name, learning_rate=0.3, momentum=0.8, weight_decay=0.01,
                      schedule="constant", ema_momentum=0.7, ema_overwrite_every=3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = make_optimizer(cfg, 7)
    assert isinstance(opt, AverageOverwrite) and opt.ema_overwrite_frequency is None
    kwargs = {"momentum": 0.8} if name == "sgd" else {}
    kwargs["weight_decay"] = 0.01
    keras_cls = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW}[name]
    ref_opt = keras_cls(learning_rate=0.3, use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=3, **kwargs)
    models = []
    for o in (opt, ref_opt):
        model = _dense_model()
        model.compile(o, loss)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 7 steps: overwrites after 3 and 6
        models.append(model)
    numpy = keras.ops.convert_to_numpy
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(opt._model_variables_moving_average, ref_opt._model_variables_moving_average):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-6, atol=1e-7)
    save_model(models[0], str(tmp_path / "m.keras"))
    loaded = load_model(str(tmp_path / "m.keras"))
    assert type(loaded.optimizer) is type(opt) and loaded.optimizer.ema_overwrite_every == 3
    with pytest.raises(ConfigError, match="ema_overwrite_every: expected null or an integer >= 1. Received: -2"):
        make_optimizer(dataclasses.replace(cfg, ema_overwrite_every=-2), 1)


def test_lookahead_optimizer_saves_and_resumes(tmp_path):
    cfg = dataclasses.replace(CFG, lookahead_every=2)
    keras.utils.set_random_seed(0)
    model = compile_model(tiny_model(), cfg, 4)
    x, y = tiny_data(32)
    fit(model, make_input(x, y, 8, True, 0), None, cfg, str(tmp_path / "la"), epochs=1)
    model, start = resume_state(str(tmp_path / "la"))
    assert start == 1 and type(model.optimizer).__name__ == "LookaheadSGD"
    assert model.optimizer.get_config()["lookahead_every"] == 2 and model.optimizer.total_steps == 12


def _two_dense(trainable_b=True):
    inputs = keras.Input((6,))
    a = keras.layers.Dense(4, name="a", kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    b = keras.layers.Dense(3, name="b", kernel_initializer=keras.initializers.GlorotUniform(seed=2))
    b.trainable = trainable_b
    return keras.Model(inputs, b(a(inputs)))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_lr_multipliers_give_a_group_the_steps_of_a_smaller_learning_rate(name):
    """Weights at factor f (`LRMultipliers`) follow the trajectory of the same optimizer at f times the
    rate, with momentum or Adam's moments, decoupled weight decay and the schedule; the other weights
    take the steps they would take without multipliers."""
    from keras_transfer.optim import make_optimizer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype("float32"), rng.integers(0, 3, 40)
    f, rate = 0.25, 0.05
    cfg = TrainConfig(epochs=1, optimizer=name, learning_rate=rate, momentum=0.9, weight_decay=0.01,
                      schedule="cosine")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    group = {v.path: f for v in _two_dense().get_layer("a").weights}
    assert sorted(group) == ["a/bias", "a/kernel"]

    def trained(cfg, multipliers, trainable_b, n):
        model = _two_dense(trainable_b)
        model.compile(make_optimizer(cfg, 5, multipliers), loss)
        model.fit(x[:8 * n], y[:8 * n], batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model

    # five steps, only the group trains: as the plain optimizer at f x the rate
    grouped = trained(cfg, group, False, 5)
    assert type(grouped.optimizer).__name__ == "LRMultipliers" + type(make_optimizer(cfg, 5)).__name__
    slower = trained(dataclasses.replace(cfg, learning_rate=rate * f), None, False, 5)
    for a, b in zip(grouped.get_weights(), slower.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    # one step, both train: the group moves f x as far, the rest as far as without multipliers
    start = _two_dense().get_weights()
    grouped, plain = trained(cfg, group, True, 1), trained(cfg, None, True, 1)
    steps = [(g - s, p - s) for g, p, s in zip(grouped.get_weights(), plain.get_weights(), start)]
    for (g, p), factor in zip(steps, [f, f, 1, 1]):  # a/kernel, a/bias, b/kernel, b/bias
        np.testing.assert_allclose(g, factor * p, rtol=1e-4, atol=3e-7)  # float32 rounding of weights near 1
        assert np.abs(p).max() > 1e-4


@pytest.mark.parametrize("lookahead", [0, 2])
def test_lr_multipliers_are_saved_with_the_optimizer_and_resume_the_same_run(tmp_path, lookahead):
    """A checkpoint keeps the groups (the optimizer's config), so a resumed run reaches the weights of an
    uninterrupted one."""
    cfg = dataclasses.replace(CFG, lookahead_every=lookahead)
    x, y = tiny_data(32)

    def run(stage, epochs):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        group = {v.path: 0.1 for v in model.get_layer("backbone").trainable_weights}
        compile_model(model, cfg, 4, group)
        fit(model, make_input(x, y, 8, True, 0), None, cfg, str(tmp_path / stage), epochs=epochs)
        return model, group

    full, group = run("full", 2)
    run("part", 1)
    model, start = resume_state(str(tmp_path / "part"))
    assert start == 1 and type(model.optimizer).__name__ == ("Lookahead" if lookahead else "") + "LRMultipliersSGD"
    assert model.optimizer.lr_multipliers == group and len(group) > 10
    fit(model, make_input(x, y, 8, True, 0, initial_epoch=1), None, cfg, str(tmp_path / "part"), initial_epoch=1,
        epochs=2)
    for a, b in zip(full.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_optimizer_names_the_config_accepts_are_the_ones_train_builds():
    from keras_transfer.config import OPTIMIZER_NAMES
    from keras_transfer.optim import OPTIMIZERS

    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES



def test_slow_epochs_echo_one_progress_line_and_fast_ones_stay_quiet(tmp_path):
    """`EpochProgress`: a line per epoch once ``min_interval`` has passed (0 here: every epoch), with the
    epoch's loss, accuracy, validation figures and time; none while epochs are quicker than it."""
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)
    lines = {}
    for interval in (0.0, 3600.0):
        lines[interval] = []
        model = tiny_model()
        compile_model(model, CFG, 4)
        fit(model, make_input(x, y, 8, True, 0), make_input(xv, yv, 8, False), CFG, str(tmp_path / str(interval)),
            epochs=2, extra_callbacks=[EpochProgress(lines[interval].append, "full     ", interval)])
    assert lines[3600.0] == []
    h = read_history(str(tmp_path / "0.0" / "history.csv"))
    assert len(lines[0.0]) == 2
    for e, line in enumerate(lines[0.0]):
        assert line.startswith(f"  full     epoch {e + 1}/2: loss {h['loss'][e]:.4f}, accuracy {h['accuracy'][e]:.4f}, "
                               f"val_loss {h['val_loss'][e]:.4f}, val_accuracy {h['val_accuracy'][e]:.4f} ("), line
        assert line.endswith(" s)")


def test_a_stage_resumed_under_early_stopping_stops_and_restores_where_an_uninterrupted_one_does(tmp_path):
    """Early stopping's waiting count, best value and best weights survive a resume: interrupted after epoch 2 and
    resumed, the stage stops at the same epoch with the same (best) weights as an uninterrupted one (patience 2:
    the earliest stop is after epoch 3, so always after the interruption)."""
    cfg = TrainConfig(epochs=12, optimizer="adam", learning_rate=0.05, schedule="constant", early_stopping=2)
    x, y = tiny_data(32)
    xv, yv = tiny_data(16, seed=1)

    def run(stage, epochs):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        compile_model(model, dataclasses.replace(cfg, epochs=epochs), 4)
        fit(model, make_input(x, y, 8, True, 0), make_input(xv, yv, 8, False), cfg, stage, epochs=epochs)
        return model

    whole = run(str(tmp_path / "whole"), 12)
    stopped = len(read_history(str(tmp_path / "whole" / "history.csv"))["epoch"])
    assert 2 < stopped < 12, stopped  # it stops early
    run(str(tmp_path / "part"), 2)
    model, start = resume_state(str(tmp_path / "part"))
    assert start == 2
    fit(model, make_input(x, y, 8, True, 0, initial_epoch=start), make_input(xv, yv, 8, False), cfg,
        str(tmp_path / "part"), initial_epoch=start)
    assert len(read_history(str(tmp_path / "part" / "history.csv"))["epoch"]) == stopped
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
