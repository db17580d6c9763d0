"""How much of the torch backend's gap to timm is Keras' own layers and calls? (unfused BatchNorm, layout
copies, per-layer __call__)

On torch, Keras computes BatchNormalization from elementwise ops (moments, then subtract / rsqrt /
multiply / add, and the same again backwards), and its convolution copies each channels-last input
twice (to contiguous NCHW, then back to channels_last memory). This script builds keras.applications
EfficientNetB0 four ways: Keras' layers (`keras`); every BatchNormalization swapped for the package's
(`keras_transfer.accel.layers`: torch's fused ``native_batch_norm``) (`bn`, the package until
2026-11-23); all of the package's fast layer calls (`fast`: `accel.layers.fast_calls`; `accel.kernels.conv2d`
hands torch the channels-last view as it is); and the fast layers called directly (`direct`:
`accel.graph.use_direct_calls`; `accel.apply`, from `compile_model`, installs both). It checks that they
give the same outputs and times a training epoch of each, alternating. Tiny inputs (``--size 32 --batch 2``)
time the host-side work per step, which bounds an eager step on a GPU.

    KERAS_BACKEND=torch python benchmarks/torch_fast_layers.py --batch 16 --steps 5 --repeats 3
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_transfer import internals  # noqa: E402
from keras_transfer.accel.graph import use_direct_calls  # noqa: E402
from keras_transfer.accel.layers import fast_calls, give_fast_call  # noqa: E402

VARIANTS = ("keras", "bn", "fast", "direct")


def build(variant, size):
    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(size, size, 3),
                                             pooling="avg")
    model = keras.Model(base.input, keras.layers.Dense(10)(base.output))
    if variant in ("fast", "direct"):
        fast_calls(model)
    elif variant == "bn":
        for layer in internals.flatten_layers(model):
            if type(layer) is keras.layers.BatchNormalization:
                give_fast_call(layer)
    if variant == "direct":
        use_direct_calls(model)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def single_layer_check():
    """One BatchNormalization in training mode against a float64 reference, both implementations.

    Keras' torch moments use E[x^2] - E[x]^2, which cancels when the mean is large against the
    spread; torch's kernel does not. Through the ~50 BatchNormalizations of an untrained
    EfficientNetB0 in training mode such differences grow large, so the whole-network outputs are
    not compared in training mode; this one layer is.
    """
    for offset in (0.0, 100.0):
        x = (np.random.default_rng(0).normal(size=(16, 14, 14, 32)) * 3 + offset).astype("float32")
        x64 = x.astype("float64")
        ref = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-3)
        errors = []
        for fused in (False, True):
            layer = keras.layers.BatchNormalization(axis=3)
            if fused:
                give_fast_call(layer)
            layer.build(x.shape)
            errors.append(np.abs(keras.ops.convert_to_numpy(layer(x, training=True)) - ref).max())
        print(f"one layer, training, channel mean {offset:5.1f}: max error vs float64: keras {errors[0]:.1e}, "
              f"fused {errors[1]:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="keras,bn,fast", help=f"comma-separated, of {', '.join(VARIANTS)}")
    a = p.parse_args()
    variants = a.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"Expected --variants from {', '.join(VARIANTS)}. Received: {a.variants!r}")
    if keras.config.backend() != "torch":
        raise SystemExit(f"Expected KERAS_BACKEND=torch. Received: {keras.config.backend()!r}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.batch * a.steps, a.size, a.size, 3)).astype("float32")
    y = rng.integers(0, 10, a.batch * a.steps)
    models = {v: build(v, a.size) for v in variants}
    ref = next(iter(models.values()))
    u = keras.ops.convert_to_numpy(ref(x[:8], training=False))
    for k, m in models.items():
        m.set_weights(ref.get_weights())
        d = np.abs(keras.ops.convert_to_numpy(m(x[:8], training=False)) - u).max()
        print(f"EfficientNetB0, inference: max |logit difference| {k} vs {variants[0]}: {d:.2e}")
    single_layer_check()
    for m in models.values():
        m.fit(x[:a.batch * 2], y[:a.batch * 2], batch_size=a.batch, epochs=1, verbose=0)  # warm-up
    rates = {k: [] for k in models}
    for _ in range(a.repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m.fit(x, y, batch_size=a.batch, epochs=1, verbose=0, shuffle=False)
            rates[k].append(a.batch * a.steps / (time.perf_counter() - t))
    for k, r in rates.items():
        print(f"{k:6s} {np.median(r):6.1f} img/s (epochs {[round(v, 1) for v in r]})")


if __name__ == "__main__":
    main()
