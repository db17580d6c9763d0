"""keras_transfer/accel: the torch fast path's one door: on only with a Keras it was tested with (or when
forced, with every symbol it needs), off for library code until enabled, and a model it was applied to
computes and saves as one built from Keras' own layers."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

from keras_transfer import accel, internals
from keras_transfer.accel.layers import has_fast_call
from keras_transfer.config import TrainConfig
from keras_transfer.errors import ConfigError
from keras_transfer.train import compile_model
from tests.conftest import python_prints_ok, tiny_data, tiny_model


@pytest.fixture
def restore_mode(monkeypatch):
    yield
    monkeypatch.undo()  # Keras' version and the table as they are, before deciding again
    accel.enable()  # as conftest leaves it


def test_a_keras_it_was_not_tested_with_keeps_it_off_and_says_so_once(monkeypatch, capsys, restore_mode):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    assert accel.enable() is False and accel.enabled() is False
    assert accel.enable() is False
    err = capsys.readouterr().err.strip().splitlines()
    if keras.config.backend() == "torch":
        assert len(err) == 1 and "tested with Keras 3.15.1, this is Keras 3.99.0" in err[0], err
        assert "KTRANSFER_ACCEL=on" in err[0]
    else:  # there it only defers TensorFlow's import: nothing to say
        assert err == []
    if not internals.missing(prefix="accel"):  # 3.99.0, really this Keras, has every symbol it needs
        assert accel.enable(force=True) is True


def test_forced_on_a_keras_without_its_symbols_stays_off(monkeypatch, capsys, restore_mode):
    rows = (*internals.INTERNALS, internals.Internal("<layer>", "_gone", None, "accel.test"))
    monkeypatch.setattr(internals, "INTERNALS", rows)
    assert accel.enable(force=True) is False
    said = "lacks 1 private symbol(s) it needs (<layer>._gone)" in capsys.readouterr().err
    assert said == (keras.config.backend() == "torch")


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("ON", "on"), ("off", "off"), ("0", "off"),
                                        ("auto", "auto")])
def test_the_environment_variable_picks_the_mode(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv(accel.ENV, raising=False)
    else:
        monkeypatch.setenv(accel.ENV, value)
    assert accel.mode_from_environment() == mode


def test_a_bad_environment_value_is_one_line(monkeypatch):
    monkeypatch.setenv(accel.ENV, "fast")
    with pytest.raises(ConfigError, match=r"KTRANSFER_ACCEL: expected one of auto, on, off. Received: 'fast'"):
        accel.mode_from_environment()


def test_the_command_refuses_a_bad_value_in_one_line(monkeypatch):
    from click.testing import CliRunner

    from keras_transfer.cli import main

    monkeypatch.setenv(accel.ENV, "fast")
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "Error: KTRANSFER_ACCEL: expected one of auto, on, off. Received: 'fast'"], r.output


def test_library_code_runs_keras_own_code_until_it_enables_it(tmp_path):
    code = ("from keras_transfer import accel\n"
            "assert accel.enabled() is False\n"
            f"assert accel.enable() is {keras.__version__ in accel.TESTED_KERAS} is accel.enabled()\n"
            "print('ok')\n")
    python_prints_ok(code, os.environ.get("KERAS_BACKEND", "jax"), tmp_path)


def _trained(on, x, y):
    if on:
        accel.enable()
    else:
        accel.disable()
    keras.utils.set_random_seed(0)
    model = compile_model(tiny_model(), TrainConfig(epochs=1, optimizer="adam", learning_rate=1e-2), 2)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    return model


def test_apply_gives_the_fast_path_on_torch_only_and_trains_as_keras_does(tmp_path, restore_mode):
    """Off, Keras' own code; on (torch), every Conv2D / BatchNormalization has its fast call and the model its
    direct calls; the two train to the same weights (float rounding: the fused BatchNorm's moments), and
    the model saves as Keras' own layers."""
    x, y = tiny_data(16)
    plain, fast = _trained(False, x, y), _trained(True, x, y)
    assert not any(has_fast_call(layer) for layer in internals.flatten_layers(plain))
    assert accel.enabled() == (keras.__version__ in accel.TESTED_KERAS)
    torch = keras.config.backend() == "torch" and accel.enabled()  # (off with a Keras it was not tested with)
    calls = [has_fast_call(layer) for layer in internals.flatten_layers(fast)
             if type(layer) in (keras.layers.Conv2D, keras.layers.BatchNormalization)]
    assert calls and all(calls) == torch and any(calls) == torch
    assert ("call" in vars(fast)) == torch  # direct calls through the graph
    for a, b in zip(plain.get_weights(), fast.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    fast.save(tmp_path / "m.keras")
    config = zipfile.ZipFile(tmp_path / "m.keras").read("config.json").decode()
    names = {obj["class_name"] for obj in _layer_configs(json.loads(config))}
    assert {"Conv2D", "BatchNormalization"} <= names
    assert '"keras_transfer>Conv2D"' not in config and '"keras_transfer>BatchNormalization"' not in config


def _layer_configs(node):
    if isinstance(node, dict):
        if "class_name" in node and "module" in node:
            yield node
        for value in node.values():
            yield from _layer_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_configs(value)
