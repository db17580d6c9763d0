"""`accel.syncs.avoid_device_syncs`: Keras' torch numbers and seeds without host-device synchronisation.

On a CPU nothing synchronises, so the tests count the operations that do on a GPU: tensors made from
host data directly on the compute device (``torch.as_tensor(data, device=...)``, a blocking copy) and
device values read back to Python (``int(t)``, ``t.item()``, ``t.tolist()``...).
"""

import keras
import numpy as np
import pytest

from keras_transfer.accel import diagnostics, syncs

pytestmark = pytest.mark.skipif(keras.config.backend() != "torch",
                                reason="the patched conversions are Keras' torch backend's")


@pytest.fixture(autouse=True)
def _patched():
    assert syncs.avoid_device_syncs()


@pytest.fixture
def counter():
    with diagnostics.SyncCounter() as c:
        yield c


NUMBERS = [0, 1, -3, 255, 300, 2**31, -(2**31) - 1, 0.1, -2.5, 1e-8, 1e40, float("inf"), True, False,
           np.float64(0.7)]
DTYPES = [None, "float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "int8", "bool"]


def _same(a, b):
    import torch

    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(a, b) or (a.is_floating_point() and bool(torch.isnan(a).all() & torch.isnan(b).all()))


def test_numbers_and_short_lists_become_the_tensors_keras_makes():
    from keras.src.backend.torch import core

    assert core.convert_to_tensor is not core.convert_to_tensor.__wrapped__  # patched
    original = core.convert_to_tensor.__wrapped__
    for x in NUMBERS + [[1, 2], (3, 4.5), [True, False], (2**31, 1), [0.5]]:
        for dtype in DTYPES:
            try:
                expected = original(x, dtype=dtype)
            except Exception as e:  # noqa: BLE001  the patched path must fail the same way
                with pytest.raises(type(e)):
                    core.convert_to_tensor(x, dtype=dtype)
                continue
            _same(core.convert_to_tensor(x, dtype=dtype), expected)


def test_numbers_are_made_on_the_device_without_host_data(counter):
    x = keras.ops.ones((2, 3))
    with counter.counting():
        keras.ops.clip(keras.ops.multiply(x, 0.9), 0, 255)
        keras.ops.cast(0.999, "float32")
    assert counter.copies == []
    counter.reset()
    with syncs.stock_keras(), counter.counting():
        keras.ops.clip(keras.ops.multiply(x, 0.9), 0, 255)
    assert len(counter.copies) == 3  # what Keras' own path copies: 0.9, 0 and 255


def test_seeded_random_ops_draw_keras_seeds(counter):
    """The same numbers and generator states as Keras' path, with no device read after the first."""
    seeds = [keras.random.SeedGenerator(7) for _ in range(2)]
    x = keras.ops.ones((4, 3, 3, 2))

    def draws(seed):
        return [keras.ops.convert_to_numpy(v) for v in (
            keras.random.uniform((3,), seed=seed), keras.random.randint((2,), 0, 100, seed=seed),
            keras.random.normal((2,), seed=seed), keras.random.dropout(x, 0.5, noise_shape=(4, 1, 1, 2), seed=seed),
            keras.random.uniform((2,), seed=123))]

    draws(seeds[0])  # the first draw reads the state once
    with counter.counting():
        ours = [draws(seeds[0]) for _ in range(3)]
    assert counter.reads.count("tolist") == 0 and "__int__" not in counter.reads
    with syncs.stock_keras():
        draws(seeds[1])
        keras_ = [draws(seeds[1]) for _ in range(3)]
    for a, b in zip(sum(ours, []), sum(keras_, []), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(seeds[0].state.value),
                                  keras.ops.convert_to_numpy(seeds[1].state.value))
    # A state written from outside (a loaded model, a restored checkpoint) is read again.
    for s in seeds:
        s.state.assign(np.array([11, 5], dtype="int32"))
    ours = draws(seeds[0])
    with syncs.stock_keras():
        keras_ = draws(seeds[1])
    for a, b in zip(ours, keras_, strict=True):
        np.testing.assert_array_equal(a, b)


def _fit_then_count(name, augment, widths, recipe, counter, monkeypatch):
    """One epoch of the package's path (batches gathered on the device, airbench's alternating flips),
    then a second epoch in which batch fetches and training steps are counted. ``recipe``: ``"adam"``
    (cosine schedule), ``"ema"`` / ``"keras-ema"`` (Adam with a weight average overwriting the weights
    every 2 steps: the package's optimizer / Keras' option) or ``"fast"``:
    `experiments/cifar10_fast.yaml`'s (Nesterov SGD, triangle schedule, ramped Lookahead), eager."""
    import dataclasses
    import os

    from keras_transfer import config
    from keras_transfer.config import TrainConfig
    from keras_transfer.data.augment import augmentation_layers
    from keras_transfer.data.pipeline import ArrayBatches
    from keras_transfer.models import build_classifier, create_backbone
    from keras_transfer.train import compile_model

    keras.utils.set_random_seed(0)
    options = {"widths": widths} if widths else {}
    if name == "airbench":
        options["bn_bias_lr"] = 64.0  # the preset's: BatchNorm biases scaled by a Python number
    model = build_classifier(create_backbone(name, 32, 3, **options), name, (32, 32, 3), 10,
                             augment=augmentation_layers(augment, 3, seed=0), head_hidden=16)
    if recipe == "fast":
        preset = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "cifar10_fast.yaml")
        cfg = dataclasses.replace(config.load(preset).pretrain, precision="float32", jit_compile=False)
    elif recipe in ("ema", "keras-ema"):  # a weight average overwriting the weights every 2 steps
        cfg = TrainConfig(optimizer="adam", schedule="constant", ema_momentum=0.9, ema_overwrite_every=2,
                          jit_compile=False)
    else:
        cfg = TrainConfig(optimizer="adam", schedule="cosine", jit_compile=False)
    compile_model(model, cfg, 2)
    if recipe == "keras-ema":  # the same average through Keras' own option
        model.compile(keras.optimizers.Adam(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2), model.loss,
                      jit_compile=False)
    rng = np.random.default_rng(0)
    data = ArrayBatches(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8) % 10, 4,
                        on_device=True, alternate_flips=True)
    model.fit(data, epochs=1, verbose=0, shuffle=False)

    def counted(fn):
        def run(*args, **kwargs):
            with counter.counting():
                return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(model, "train_step", counted(model.train_step))
    monkeypatch.setattr(ArrayBatches, "__getitem__", counted(ArrayBatches.__getitem__))
    counter.reset()
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    return model, data


def test_weight_average_overwrite_reads_nothing_back_where_keras_option_does(counter, monkeypatch):
    """``ema_overwrite_every`` (`optim.AverageOverwrite`) overwrites by a select; Keras' own
    ``ema_overwrite_frequency`` through ``ops.cond``, which reads its predicate every step on torch."""
    _fit_then_count("resnet", "none", (8, 16, 16), "ema", counter, monkeypatch)
    assert counter.copies == [] and counter.reads == []
    _fit_then_count("resnet", "none", (8, 16, 16), "keras-ema", counter, monkeypatch)
    assert counter.copies == [] and len(counter.reads) >= 2  # one per step: 2 steps


@pytest.mark.parametrize("name,augment,widths,recipe", [
    ("resnet", "strong", (8, 16, 16), "adam"), ("efficientnet_b0", "mild", None, "adam"),
    ("airbench", "translate", (8, 16, 16), "fast")])
def test_a_training_step_copies_no_number_and_reads_nothing_back(name, augment, widths, recipe, counter, monkeypatch):
    _fit_then_count(name, augment, widths, recipe, counter, monkeypatch)
    assert counter.copies == [] and counter.reads == []
    with syncs.stock_keras():  # Keras' own path does both, every step: the count can fail
        _fit_then_count(name, augment, widths, recipe, counter, monkeypatch)
    assert len(counter.copies) > 2 and counter.reads
