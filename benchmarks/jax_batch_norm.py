"""Batch statistics in one pass or two: XLA's memory traffic and step time of a JAX training step.

Keras' JAX BatchNormalization computes the batch variance as ``jnp.var``: the mean first, then the mean
of squared deviations, so a training step reads every normalised activation once more than a one-pass
formula (``E[x^2] - E[x]^2``, Flax's default ``use_fast_variance``), whose two sums XLA fuses into one
pass. This script compiles the bench's EfficientNetB0 training step (``compile_model``, XLA) with the
package's BatchNormalization computing its batch statistics three ways, and reports for each XLA's
own cost analysis of the compiled step ("bytes accessed", flops) and the median time per step of
``--steps`` steps on batches already on the device, the three compiled steps taking turns:

- ``keras``: Keras' layer as the package ships it (two passes);
- ``onepass``: ``E[x^2] - E[x]^2`` in float32, clipped at 0 (Flax's formula);
- ``shifted``: the same sums of ``x - k`` with ``k`` the batch's first pixel per channel, which keeps
  the one-pass formula accurate when a channel's mean is large against its spread.

An experiment, not the package's path: nothing here changes what ``ktransfer`` runs.

    KERAS_BACKEND=jax python benchmarks/jax_batch_norm.py --size 224 --batch 256 --steps 30 --repeats 3
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_transfer import backend  # noqa: E402
from keras_transfer.bench import ours_and_plain, synthetic_images  # noqa: E402
from keras_transfer.optim import set_precision  # noqa: E402

VARIANTS = ("keras", "onepass", "shifted")


def one_pass_batch_norm(x, gamma, beta, epsilon, shifted):
    """``(y, mean, variance)`` of a channels-last batch from one pass of sums (``jax.numpy``)."""
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    k = jax.lax.stop_gradient(xf[:1, :1, :1, :]) if shifted else jnp.zeros((1, 1, 1, x.shape[-1]), jnp.float32)
    d = xf - k
    m1 = jnp.mean(d, (0, 1, 2))
    variance = jnp.maximum(jnp.mean(jnp.square(d), (0, 1, 2)) - jnp.square(m1), 0.0)
    mean = m1 + k[0, 0, 0]
    inv = jax.lax.rsqrt(variance + epsilon)
    if gamma is not None:
        inv = inv * gamma.astype(jnp.float32)
    shift = -mean * inv  # Keras' batch_normalization: x * inv + (beta - mean * inv)
    if beta is not None:
        shift = shift + beta.astype(jnp.float32)
    return (xf * inv + shift).astype(x.dtype), mean, variance


class _Variant:
    """Within the block, Keras' BatchNormalization (its class patched) computes training-mode statistics as
    ``name``."""

    keras_call = staticmethod(keras.layers.BatchNormalization.call)

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if self.name == "keras":
            return self
        shifted, keras_call = self.name == "shifted", self.keras_call

        def call(layer, inputs, training=None, mask=None):
            if not (training and layer.trainable and mask is None and len(inputs.shape) == 4 and layer.axis in (-1, 3)):
                return keras_call(layer, inputs, training=training, mask=mask)
            y, mean, variance = one_pass_batch_norm(inputs, layer.gamma.value if layer.scale else None,
                                                    layer.beta.value if layer.center else None, layer.epsilon,
                                                    shifted)
            m = layer.momentum
            for moving, batch in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                moving.assign(moving * m + keras.ops.cast(batch, moving.dtype) * (1 - m))
            return y

        keras.layers.BatchNormalization.call = call
        return self

    def __exit__(self, *exc):
        keras.layers.BatchNormalization.call = self.keras_call


def compiled_step(model, x, y):
    """``model``'s training step, compiled by XLA for batches like ``(x, y)`` with the state donated, and
    XLA's cost analysis of it: (step, state, GiB accessed, GFLOP, compile seconds)."""
    import jax

    model._symbolic_build(data_batch=(x[:2], y[:2]))  # Keras' own build of optimizer and metric variables
    state = jax.tree.map(lambda v: jax.numpy.array(v.value), (model.trainable_variables, model.non_trainable_variables,
                                                             model.optimizer.variables, model.metrics_variables))
    t0 = time.perf_counter()
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
    seconds = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return compiled, state, ca["bytes accessed"] / 2**30, ca["flops"] / 1e9, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="mixed_bfloat16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args()
    assert keras.config.backend() == "jax", "the JAX backend is needed"
    set_precision(a.precision)
    import jax

    x, y = synthetic_images(4 * a.batch, a.size)
    batches = [(jax.device_put(x[i::4]), jax.device_put(y[i::4])) for i in range(4)]  # on the device already
    runs = {}
    for name in a.variants.split(","):
        with _Variant(name):
            model, _ = ours_and_plain(a.model, a.size, "full", a.steps, a.precision, jit=True)
            step, state, gib, gflop, seconds = compiled_step(model, *batches[0])
        runs[name] = {"step": step, "state": state, "gib": gib, "gflop": gflop, "compile_s": seconds, "ms": []}
        del model
    for _ in range(a.repeats):
        for r in runs.values():
            state = r["state"]
            _, state = r["step"](state, batches[0])  # warm
            jax.block_until_ready(state)
            t = time.perf_counter()
            for i in range(a.steps):
                _, state = r["step"](state, batches[i % 4])
            jax.block_until_ready(state)
            r["ms"].append(1000 * (time.perf_counter() - t) / a.steps)
            r["state"] = state
    print(f"{a.model} {a.size}x{a.size}, batch {a.batch}, {a.precision}, full fine-tune, {a.steps} steps x "
          f"{a.repeats} rounds per variant; {'; '.join(backend.backend_info())}\n")
    print("| batch statistics | XLA GiB accessed per step | GFLOP | compile s | ms per step (median) | img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        ms = float(np.median(r["ms"]))
        print(f"| {name} | {r['gib']:.2f} | {r['gflop']:.0f} | {r['compile_s']:.1f} | {ms:.1f} | "
              f"{1000 * a.batch / ms:,.0f} |")


if __name__ == "__main__":
    main()
