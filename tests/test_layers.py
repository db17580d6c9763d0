"""keras_transfer/accel/layers.py: Keras layers given fast calls that run torch's kernels directly (fused
BatchNorm, copy-free convolutions, pooling, padding) against Keras' own layers, outputs and gradients."""


import keras
import numpy as np
import pytest

from keras_transfer import internals
from keras_transfer.accel import diagnostics, kernels
from keras_transfer.accel.layers import FAST_CALLS, fast_calls, give_fast_call, has_fast_call
from keras_transfer.models import create_backbone


def BatchNorm(**kwargs):
    return give_fast_call(keras.layers.BatchNormalization(**kwargs))


@pytest.mark.parametrize("scale", [True, False])
def test_fused_batch_norm_matches_keras_batch_normalization(scale):

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 5, 5, 6)) * 3 + 2).astype("float32")
    ref, ours = keras.layers.BatchNormalization(momentum=0.8, scale=scale), BatchNorm(momentum=0.8, scale=scale)
    for layer in (ref, ours):
        layer.build(x.shape)
    ours.set_weights([rng.normal(size=w.shape).astype("float32") + (w.shape[0] == 6) for w in ref.get_weights()])
    ours.moving_variance.assign(np.abs(ours.moving_variance.numpy()) + 0.5)
    ref.set_weights(ours.get_weights())
    numpy = keras.ops.convert_to_numpy
    for training in (True, True, False):  # two training calls move the statistics twice
        np.testing.assert_allclose(numpy(ours(x, training=training)), numpy(ref(x, training=training)),
                                   rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    gamma = ours.gamma if scale else None
    fused = kernels.fused_batch_norm(keras.ops.convert_to_tensor(x), gamma, ours.beta, 1e-3)
    assert (fused is not None) == (keras.config.backend() == "torch")
    ours.trainable = False  # frozen: inference mode, statistics untouched
    frozen = [w.copy() for w in ours.get_weights()]
    np.testing.assert_allclose(numpy(ours(x, training=True)), numpy(ref(x, training=False)), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.get_weights(), frozen):
        np.testing.assert_array_equal(a, b)


def test_fused_batch_norm_in_mixed_precision_matches_keras():

    x = (np.random.default_rng(3).normal(size=(8, 5, 5, 6)) * 3 + 2).astype("float32")
    ref, ours = keras.layers.BatchNormalization(dtype="mixed_bfloat16"), BatchNorm(dtype="mixed_bfloat16")
    y_ref, y_ours = ref(x, training=True), ours(x, training=True)
    assert keras.backend.standardize_dtype(y_ours.dtype) == "bfloat16" and ours.moving_mean.dtype == "float32"
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(numpy(keras.ops.cast(y_ours, "float32")), numpy(keras.ops.cast(y_ref, "float32")),
                               atol=0.02)
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), ref.moving_variance.numpy(), rtol=1e-5, atol=1e-6)


def _torch_gradients(layer, x, w, **call_kwargs):
    """Gradients of ``sum(layer(x) * w)`` with respect to ``x`` and the layer's trainable weights, as
    numpy arrays (torch backend)."""
    import torch

    xt = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
    y = layer(xt, **call_kwargs)
    loss = (y * torch.as_tensor(w, device=y.device)).sum()
    return [g.cpu().numpy() for g in torch.autograd.grad(loss, [xt] + [v.value for v in layer.trainable_weights])]


def test_fused_batch_norm_gradients_match_on_torch():
    if keras.config.backend() != "torch":
        pytest.skip("the fused kernel is torch's; elsewhere BatchNorm is Keras' layer unchanged")

    x = np.random.default_rng(1).normal(size=(4, 3, 3, 5)).astype("float32") * 2 + 1
    w = np.random.default_rng(2).normal(size=(4, 3, 3, 5)).astype("float32")
    grads = []
    for layer in (keras.layers.BatchNormalization(), BatchNorm()):
        layer.build(x.shape)
        grads.append(_torch_gradients(layer, x, w, training=True))  # x, gamma, beta
    assert len(grads[0]) == 3
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_takes_bfloat16_as_it_is():
    """A bfloat16 batch goes into torch's kernel without a float32 copy: the same outputs as the float32
    computation rounded to bfloat16, float32 statistics, and the same gradients."""
    if keras.config.backend() != "torch":
        pytest.skip("the fused kernel is torch's; elsewhere BatchNorm is Keras' layer unchanged")
    import torch


    torch.manual_seed(0)
    gamma, beta = (keras.Variable(v, dtype="float32") for v in (np.linspace(0.5, 1.5, 16), np.zeros(16)))
    device = gamma.value.device  # a GPU where there is one
    x = (torch.randn(8, 7, 7, 16, device=device) * 3 + 1).to(torch.bfloat16)
    w = torch.randn(8, 7, 7, 16, device=device)
    results = []
    for cast in (False, True):
        xt = x.clone().requires_grad_(True)
        if cast:  # the former path: float32 in, bfloat16 out
            v = xt.permute(0, 3, 1, 2).float()
            y, mean, invstd = torch.native_batch_norm(v, gamma.value, beta.value, None, None, True, 0.0, 1e-3)
            y, variance = y.to(torch.bfloat16).permute(0, 2, 3, 1), invstd.pow(-2) - 1e-3
        else:
            y, mean, variance = kernels.fused_batch_norm(xt, gamma, beta, 1e-3)
        assert y.dtype == torch.bfloat16 and mean.dtype == variance.dtype == torch.float32
        grads = torch.autograd.grad((y.float() * w).sum(), [xt, gamma.value, beta.value])
        results.append([y.float(), mean, variance.detach(), *(g.float() for g in grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)  # outputs: bit-identical


def test_fast_layers_launch_fewer_torch_ops_and_keep_keras_statistics_rule():
    """On torch, the fused BatchNorm moves its statistics with one in-place ``lerp_`` each (Keras' assign
    takes ten ops for the two) and a convolution's bias goes into the convolution (no add after it);
    in Keras' stateless scope the statistics update is Keras' assign, recorded in the scope. Counted with
    `diagnostics.op_counter` (operators other than views: kernel launches on a GPU)."""
    if keras.config.backend() != "torch":
        pytest.skip("torch ops are counted; elsewhere these are Keras' layers")

    x = (np.random.default_rng(0).normal(size=(8, 5, 5, 6)) * 3 + 2).astype("float32")
    xt = keras.ops.convert_to_tensor(x)
    bn = give_fast_call(keras.layers.BatchNormalization(momentum=0.8))
    bn.build(x.shape)
    ref = keras.layers.BatchNormalization(momentum=0.8)
    ref.build(x.shape)
    ref(xt, training=True)  # the first call builds Keras' helpers; count the second
    with diagnostics.op_counter() as keras_ops:
        ref(xt, training=True)
    with diagnostics.op_counter() as ours:
        bn(xt, training=True)
    assert ours.counts == {"native_batch_norm": 1, "pow": 1, "sub": 1, "lerp_": 2}, ours.counts
    assert sum(keras_ops.counts.values()) > 10
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.2 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.8 + 0.2 * var, rtol=1e-5)

    before = [w.copy() for w in bn.get_weights()]
    with keras.StatelessScope() as scope:
        bn(xt, training=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[2])  # untouched: the scope holds the update
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scope.get_current_value(bn.moving_mean)),
                               0.8 * before[2] + 0.2 * mean, rtol=1e-5, atol=1e-7)

    for layer in (keras.layers.Conv2D(4, 3, padding="same"), keras.layers.DepthwiseConv2D(3, padding="same")):
        give_fast_call(layer).build(x.shape)
        with diagnostics.op_counter() as ops:
            layer(xt)
        assert ops.counts["convolution"] == 1 and "add" not in ops.counts, (type(layer).__name__, ops.counts)


def test_applications_backbones_train_through_the_fast_layers():

    L = keras.layers
    expected = {"mobilenet_v2": (L.BatchNormalization, L.Conv2D, L.DepthwiseConv2D, L.ZeroPadding2D),
                "efficientnet_b0": (L.GlobalAveragePooling2D,),  # squeeze-excite and the pool
                "resnet": (L.BatchNormalization, L.Conv2D, L.GlobalAveragePooling2D),
                "airbench": (L.BatchNormalization, L.Conv2D, L.MaxPooling2D)}
    assert set(FAST_CALLS) == {cls for classes in expected.values() for cls in classes}
    for name, classes in expected.items():
        bb = create_backbone(name, 32, 3)
        assert not any(has_fast_call(layer) for layer in bb.layers)  # built as Keras' own layers
        assert fast_calls(bb) == sum(type(layer) in FAST_CALLS for layer in internals.flatten_layers(bb))
        for keras_cls in classes:
            found = [layer for layer in bb.layers if type(layer) is keras_cls]
            assert found and all(has_fast_call(layer) for layer in found), (name, keras_cls)


CONV_CASES = [  # (layer, kernel, strides, padding, dilation, groups or depth multiplier, bias)
    ("conv", 3, 1, "same", 1, 1, False),
    ("conv", 3, 2, "same", 1, 1, True),   # odd input, stride 2: padding split unevenly
    ("conv", 2, 1, "same", 1, 1, False),  # even kernel: extra pixel at the bottom / right
    ("conv", 3, 1, "same", 2, 1, False),
    ("conv", 1, 2, "valid", 1, 1, True),
    ("conv", 3, 1, "valid", 1, 2, False),
    ("depthwise", 3, 2, "same", 1, 2, True),
    ("depthwise", 5, 1, "same", 1, 1, False),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fast_convolutions_match_keras_outputs_and_gradients(case):
    """Fast-call `Conv2D` / `DepthwiseConv2D` (torch: `kernels.conv2d`, no layout copies) compute
    Keras' convolution: outputs on every backend, input and weight gradients on torch."""
    kind, k, s, padding, d, g, bias = case
    if kind == "conv":
        args = dict(filters=6, kernel_size=k, strides=s, padding=padding, dilation_rate=d, groups=g, use_bias=bias)
        ref, ours = keras.layers.Conv2D(**args), give_fast_call(keras.layers.Conv2D(**args))
    else:
        args = dict(kernel_size=k, strides=s, padding=padding, dilation_rate=d, depth_multiplier=g, use_bias=bias)
        ref, ours = keras.layers.DepthwiseConv2D(**args), give_fast_call(keras.layers.DepthwiseConv2D(**args))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, 4)).astype("float32")
    for layer in (ref, ours):
        layer.build(x.shape)
    ref.set_weights([rng.normal(size=w.shape).astype("float32") for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(numpy(ours(x)), numpy(ref(x)), rtol=1e-5, atol=1e-5)
    direct = kernels.conv2d(keras.ops.convert_to_tensor(x), ours.kernel, ours.strides, padding, ours.dilation_rate,
                            depthwise=kind == "depthwise")
    assert (direct is not None) == (keras.config.backend() == "torch")
    if keras.config.backend() != "torch":
        return
    w = rng.normal(size=ref(x).shape).astype("float32")
    grads = [_torch_gradients(layer, x, w) for layer in (ref, ours)]  # x, kernel (, bias)
    assert len(grads[0]) == 2 + bias
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool,strides,padding", [(2, None, "valid"), (3, 2, "valid"), (2, 1, "same")])
def test_fast_max_pooling_matches_keras(pool, strides, padding):

    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype("float32")
    ref, ours = (keras.layers.MaxPooling2D(pool, strides=strides, padding=padding),
                 give_fast_call(keras.layers.MaxPooling2D(pool, strides=strides, padding=padding)))
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(numpy(ours(x)), numpy(ref(x)))
    if keras.config.backend() == "torch":  # the gradient goes to the same maxima
        shape = ref(x).shape
        w = np.arange(np.prod(shape), dtype="float32").reshape(shape)
        (g_ref,), (g_ours,) = (_torch_gradients(layer, x, w) for layer in (ref, ours))
        np.testing.assert_array_equal(g_ours, g_ref)


@pytest.mark.parametrize("padding", [1, ((0, 1), (2, 0))])
def test_fast_zero_padding_matches_keras(padding):

    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype("float32")
    ref, ours = keras.layers.ZeroPadding2D(padding), give_fast_call(keras.layers.ZeroPadding2D(padding))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(ref(x)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_fast_global_average_pooling_matches_keras(dtype, keepdims):
    """A fast-call `GlobalAveragePooling2D` (torch: `kernels.spatial_mean`, the mean in the batch's own dtype)
    gives Keras' output on every backend and, on torch, Keras' input gradient, without casting a
    bfloat16 batch to float32 and back as Keras' torch mean does (passes over the whole activation)."""

    rng = np.random.default_rng(0)
    x = keras.ops.cast(rng.normal(size=(3, 5, 4, 6)) * 2 + 1, dtype)
    ref, ours = (keras.layers.GlobalAveragePooling2D(keepdims=keepdims, dtype=dtype),
                 give_fast_call(keras.layers.GlobalAveragePooling2D(keepdims=keepdims, dtype=dtype)))

    def numpy(t):
        return keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))

    tol = 2.0**-8 if dtype == "bfloat16" else 1e-6  # one bfloat16 rounding step: torch sums in another order
    np.testing.assert_allclose(numpy(ours(x)), numpy(ref(x)), rtol=tol, atol=tol)
    assert keras.ops.convert_to_numpy(keras.ops.cast(ours(x), "float32")).shape == ref(x).shape
    assert keras.backend.standardize_dtype(ours(x).dtype) == dtype
    if keras.config.backend() != "torch":
        return
    import torch

    w = torch.as_tensor(rng.normal(size=tuple(ref(x).shape))).to(x.dtype)
    grads, counts = [], []
    for layer in (ref, ours):
        xt = x.detach().clone().requires_grad_(True)
        with diagnostics.op_counter() as ops:
            (layer(xt) * w).sum().backward()
        grads.append(numpy(xt.grad))
        counts.append(ops.counts)
    np.testing.assert_allclose(grads[1], grads[0], rtol=tol, atol=tol)
    assert "_to_copy" not in counts[1], counts[1]
    if dtype == "bfloat16":
        assert counts[0]["_to_copy"] >= 3, counts[0]  # what Keras' mean does
