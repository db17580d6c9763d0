"""Direct layer calls (keras_transfer/accel/graph.py): the same outputs, gradients and statistics as Keras' calls."""

import keras
import numpy as np
import pytest

from keras_transfer.accel.graph import use_direct_calls
from keras_transfer.accel.layers import fast_calls
from keras_transfer.models import build_classifier, create_backbone

pytestmark = pytest.mark.skipif(keras.config.backend() != "torch",
                                reason="direct calls are torch-only; JAX and TensorFlow trace the forward pass once")


def _classifier(name, size, **options):
    keras.utils.set_random_seed(0)
    backbone = create_backbone(name, size, 3, **options)
    return build_classifier(backbone, name, (size, size, 3), 5, augment=[keras.layers.RandomFlip("horizontal")])


def _pair(name, size, **options):
    """Two identical classifiers (same weights, same random-number streams), both with the fast layer calls
    training gives them (`accel.layers`); the second calls its layers directly."""
    keras_model, direct = _classifier(name, size, **options), _classifier(name, size, **options)
    direct.set_weights(keras_model.get_weights())
    for model in (keras_model, direct):
        fast_calls(model)
    return keras_model, use_direct_calls(direct)


def _count_keras_calls(model):
    """Counts ``Layer.__call__`` per layer (they pass through torch's Module.__call__, hence its hooks)."""
    counts = {}
    for layer in model._flatten_layers(include_self=True):
        layer.register_forward_pre_hook(lambda m, args, _c=counts: _c.__setitem__(m.name, _c.get(m.name, 0) + 1))
    return counts


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


MODELS = [("resnet", 16, {"widths": (8, 16, 16)}), ("efficientnet_b0", 32, {}), ("mobilenet_v2", 32, {}),
          ("airbench", 16, {"widths": (8, 16, 16)})]


@pytest.mark.parametrize("name,size,options", MODELS, ids=[m[0] for m in MODELS])
def test_direct_calls_match_keras_outputs_gradients_and_statistics(name, size, options):
    import torch

    keras_model, direct = _pair(name, size, **options)
    calls = _count_keras_calls(direct)
    x = np.random.default_rng(0).integers(0, 256, (4, size, size, 3)).astype("uint8")
    w = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    grads = []
    for model in (keras_model, direct):
        y = model(x, training=True)  # dropout, random flip and batch statistics: the same streams
        loss = (y * torch.as_tensor(w)).sum()
        grads.append([g.numpy() for g in torch.autograd.grad(loss, [v.value for v in model.trainable_weights])])
        grads[-1].append(_numpy(y))
    for g_keras, g_direct in zip(*grads, strict=True):
        np.testing.assert_array_equal(g_direct, g_keras)
    # moving statistics took the same update
    for a, b in zip(keras_model.non_trainable_weights, direct.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(_numpy(b), _numpy(a), err_msg=a.path)
    np.testing.assert_array_equal(_numpy(direct(x, training=False)), _numpy(keras_model(x, training=False)))
    # Only the models went through Keras' __call__, and the one layer that casts its input (uint8 images)
    # (one training and one inference call each).
    assert calls == {direct.name: 2, "backbone": 2, "pre_cast": 2}


def test_direct_calls_train_as_keras_does_under_fit():
    keras_model, direct = _pair("resnet", 16, widths=(8, 16, 16))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (12, 16, 16, 3)).astype("uint8"), rng.integers(0, 5, 12)
    histories = []
    for model in (keras_model, direct):
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        histories.append(model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"])
        histories.append(model.predict(x, batch_size=4, verbose=0))
    np.testing.assert_array_equal(histories[2], histories[0])
    np.testing.assert_array_equal(histories[3], histories[1])
    for a, b in zip(keras_model.weights, direct.weights, strict=True):
        np.testing.assert_array_equal(_numpy(b), _numpy(a), err_msg=a.path)


def test_direct_calls_keep_the_autocast_of_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        keras_model, direct = _pair("efficientnet_b0", 32)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    outputs = [model(x, training=True) for model in (keras_model, direct)]
    assert keras.backend.standardize_dtype(outputs[1].dtype) == keras.backend.standardize_dtype(outputs[0].dtype)
    np.testing.assert_array_equal(_numpy(outputs[1]), _numpy(outputs[0]))
    conv = direct.get_layer("backbone").get_layer("stem_conv")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"


def test_float32_layers_in_a_mixed_model_are_not_autocast():
    """A float32 layer fed float32 inside a mixed_bfloat16 model: Keras lifts the model's autocast scope
    for it, so its kernel is read in float32; a direct call inside that scope would read bfloat16."""
    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        x = keras.layers.Dense(8, dtype="float32")(inputs)
        return keras.Model(inputs, keras.layers.Dense(8, dtype="float32")(keras.layers.Dense(8)(x)))

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        keras_model, direct = build(), use_direct_calls(build())
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    np.testing.assert_array_equal(_numpy(direct(x, training=True)), _numpy(keras_model(x, training=True)))


def test_keras_path_where_direct_calls_would_differ():
    keras_model, direct = _pair("resnet", 16, widths=(8, 16, 16))
    calls = _count_keras_calls(direct)
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("uint8")
    # No explicit training: Keras resolves it from the call context and signature defaults (here the
    # random flip's training=True default even reaches the layers after it).
    np.testing.assert_array_equal(_numpy(direct(x)), _numpy(keras_model(x)))
    top = direct.layers[1:]  # after the InputLayer
    assert [calls.get(layer.name) for layer in top] == [1] * len(top)
    # A layer that can create a mask: the model keeps Keras' calls altogether.
    inputs = keras.Input((3,), dtype="int32")
    masked = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(9, 4)(inputs))))
    assert "call" not in vars(use_direct_calls(masked))


def test_a_model_with_direct_calls_saves_and_loads(tmp_path):
    from keras_transfer.io import load_model, save_model

    _, direct = _pair("resnet", 16, widths=(8, 16, 16))
    path = str(tmp_path / "m.keras")
    save_model(direct, path)
    loaded = load_model(path)
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("uint8")
    np.testing.assert_array_equal(_numpy(loaded(x, training=False)), _numpy(direct(x, training=False)))


def test_batch_statistics_of_a_forward_pass_move_together_by_keras_rule():
    """Inside a direct-call forward pass every fast BatchNormalization queues its moving-statistics update
    and the pass applies them at its end as three multi-tensor operators (``_foreach_pow``, ``_sub_``,
    ``_lerp_``) instead of four small operators per layer; the values are Keras' rule, including a
    layer called twice in one pass (its first update goes first), and an error in the pass drops the queue."""
    import torch

    from keras_transfer.accel import diagnostics, kernels
    from keras_transfer.accel.layers import has_fast_call

    inputs = keras.Input((6, 6, 3))
    shared = keras.layers.BatchNormalization(momentum=0.7, name="shared")
    x = shared(keras.layers.Conv2D(3, 3, padding="same", name="c1")(inputs))
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn2")(x)
    x = shared(keras.layers.Conv2D(3, 1, name="c3")(x))  # the same layer again: 3 channels
    outputs = keras.layers.BatchNormalization(momentum=0.9, name="bn3")(x)
    keras_model = keras.Model(inputs, outputs)
    direct = keras.Model(inputs, outputs)  # the same layers: compare statistics by re-running from a copy
    fast_calls(direct)  # (Keras' path below calls the fast BatchNorm too: it moves its statistics at once)
    use_direct_calls(direct)
    xb = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32") * 3 + 1)

    start = [w.numpy().copy() for w in keras_model.non_trainable_weights]
    y_keras = _numpy(keras_model(xb, training=True))  # Keras' path: each layer moves its own, at once
    after_keras = [w.numpy().copy() for w in keras_model.non_trainable_weights]
    for w, v in zip(direct.non_trainable_weights, start):
        w.assign(v)
    with diagnostics.op_counter() as ops:
        y_direct = _numpy(direct(xb, training=True))
    np.testing.assert_array_equal(y_direct, y_keras)
    for w, v in zip(direct.non_trainable_weights, after_keras, strict=True):
        np.testing.assert_allclose(w.numpy(), v, rtol=1e-6, atol=1e-7, err_msg=w.path)
    # The shared layer's first update is applied before its second is queued: two batches (one
    # _foreach_pow each), each with one _foreach_lerp_ per momentum (0.7 and 0.9).
    assert (ops.counts["_foreach_pow"], ops.counts["_foreach_lerp_"], ops.counts["lerp_"]) == (2, 4, 0), ops.counts
    assert ops.counts["native_batch_norm"] == 4

    # a whole network: one _foreach_lerp_ where each layer had two lerp_
    model = _classifier("efficientnet_b0", 32)
    fast_calls(model)
    use_direct_calls(model)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    with diagnostics.op_counter() as ops:
        with torch.no_grad():
            model(x, training=True)
    bn = sum(isinstance(layer, keras.layers.BatchNormalization) and has_fast_call(layer)
             for layer in model._flatten_layers())
    assert bn > 40 and ops.counts["native_batch_norm"] == bn
    found = [ops.counts[k] for k in ("_foreach_lerp_", "_foreach_pow", "lerp_", "pow")]
    assert found == [1, 1, 0, 0], ops.counts

    before = [_numpy(w).copy() for w in model.non_trainable_weights]
    with pytest.raises(RuntimeError, match="stop"):
        with kernels.batched_statistics():
            model(x, training=True)
            raise RuntimeError("stop")
    for w, v in zip(model.non_trainable_weights, before, strict=True):
        np.testing.assert_array_equal(_numpy(w), v)
