"""keras_transfer/internals.py: every private Keras and torch symbol the package relies on is there, on this
backend, so that a Keras upgrade that renames one fails here, loudly, instead of silently disabling an
override or a fast path."""

import keras
import pytest

from keras_transfer import internals


def test_every_private_symbol_the_package_relies_on_is_there():
    """All of them with a Keras the fast path was tested with; with another (the oldest supported), those that
    code outside the fast path needs (the fast path stays off there: tests/test_accel.py)."""
    from keras_transfer import accel

    rows = [r for r in internals.INTERNALS if r.backend in (None, keras.config.backend())]
    assert len(rows) >= 30
    gone = internals.missing()
    if keras.__version__ not in accel.TESTED_KERAS:
        needed = {f"{r.owner}.{r.name}" for r in rows if not all(u.startswith("accel") for u in internals.users(r))}
        gone = [g for g in gone if g in needed]
    assert gone == [], "Keras / torch no longer have these: see keras_transfer/internals.py"


def test_a_missing_symbol_is_named(monkeypatch):
    rows = (*internals.INTERNALS,
            internals.Internal("keras.optimizers:Optimizer", "_renamed_hook", None, "accel.test"),
            internals.Internal("keras.src.no_such_module", "thing", None, "optim.test"),
            internals.Internal("<layer>", "_no_such_attribute", None, "accel.test"))
    monkeypatch.setattr(internals, "INTERNALS", rows)
    assert internals.missing() == ["keras.optimizers:Optimizer._renamed_hook", "keras.src.no_such_module.thing",
                                   "<layer>._no_such_attribute"]
    assert internals.missing(prefix="accel") == ["keras.optimizers:Optimizer._renamed_hook",
                                                 "<layer>._no_such_attribute"]


def test_rows_name_a_user_and_a_known_backend():
    for row in internals.INTERNALS:
        assert row.backend in (None, "torch", "jax", "tensorflow") and row.used_by, row
        assert {u.split(".")[0] for u in internals.users(row)} <= {"accel", "optim", "methods", "callbacks",
                                                                   "backend"}, row


def test_flatten_layers_reaches_nested_models_and_seed_generators():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="inner_dense")(inner_in), name="inner")
    inputs = keras.Input((4,))
    dropout = keras.layers.Dropout(0.5, seed=1, name="drop")
    model = keras.Model(inputs, dropout(inner(inputs)))
    names = [layer.name for layer in internals.flatten_layers(model)]
    assert names[0] == model.name and {"inner", "inner_dense", "drop"} <= set(names)
    assert model.name not in [layer.name for layer in internals.flatten_layers(model, include_self=False)]
    assert internals.is_leaf(dropout) and not internals.is_leaf(inner)
    generators = internals.seed_generators(dropout)
    assert len(generators) == 1 and isinstance(generators[0], keras.random.SeedGenerator)


def test_global_seed_is_the_one_keras_was_given():
    keras.utils.set_random_seed(123)
    assert internals.global_seed() == 123


@pytest.mark.skipif(keras.config.backend() != "torch", reason="Keras' torch device")
def test_torch_device_is_where_keras_computes():
    assert str(internals.torch_device()) == str(keras.ops.convert_to_tensor(0.0).device)


def _auto_names():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    return [model.name, model.layers[0].name, model.layers[1].name, keras.Variable(0.0).name,
            keras.optimizers.SGD().name, keras.random.SeedGenerator().name]


def test_the_check_leaves_random_states_and_automatic_names_as_they_were():
    """`accel.install` runs the check once per process, possibly inside a run: it must not move Python's or
    NumPy's random state (an unseeded initializer draws from Python's) nor Keras' automatic names."""
    import random

    import numpy as np

    keras.backend.clear_session()
    expected = [_auto_names(), _auto_names()]
    keras.backend.clear_session()
    first = _auto_names()
    random.seed(3)
    np.random.seed(3)
    state, np_state = random.getstate(), np.random.get_state()[1].copy()
    internals.missing()
    assert random.getstate() == state and np.array_equal(np.random.get_state()[1], np_state)
    assert [first, _auto_names()] == expected
