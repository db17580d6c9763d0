"""How much of the torch backend's gap to timm is Keras' unfused BatchNormalization?

On torch, Keras computes BatchNormalization from elementwise ops (moments, then subtract / rsqrt /
multiply / add, and the same again backwards). This script builds keras.applications EfficientNetB0
twice: with Keras' BatchNormalization, and with every one swapped for the package's BatchNormalization
(`keras_transfer.models.norm.BatchNormalization`, what `create_backbone` builds), whose training call is torch's fused
``native_batch_norm`` (moving statistics updated with Keras' rule and biased variance). It checks
that both give the same outputs and times a training epoch of each, alternating.

    KERAS_BACKEND=torch python benchmarks/torch_fused_bn.py --batch 16 --steps 5 --repeats 3
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_transfer.models.norm import BatchNormalization as FusedBatchNormalization
from keras_transfer.models.norm import use_fused_batch_norm  # noqa: E402


def build(fused, size):
    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(size, size, 3),
                                             pooling="avg")
    if fused:
        base = use_fused_batch_norm(base)
    model = keras.Model(base.input, keras.layers.Dense(10)(base.output))
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
        for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
            layer = cls(axis=3)
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
    a = p.parse_args()
    if keras.config.backend() != "torch":
        raise SystemExit(f"Expected KERAS_BACKEND=torch. Received: {keras.config.backend()!r}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.batch * a.steps, a.size, a.size, 3)).astype("float32")
    y = rng.integers(0, 10, a.batch * a.steps)
    models = {"keras BatchNormalization": build(False, a.size), "fused BatchNormalization": build(True, a.size)}
    ref, fused = models.values()
    fused.set_weights(ref.get_weights())
    u, v = (keras.ops.convert_to_numpy(m(x[:8], training=False)) for m in (ref, fused))
    print(f"EfficientNetB0, inference: max |logit difference| {np.abs(u - v).max():.2e}")
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
        print(f"{k:26s} {np.median(r):6.1f} img/s (epochs {[round(v, 1) for v in r]})")


if __name__ == "__main__":
    main()
