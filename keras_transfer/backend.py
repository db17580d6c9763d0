"""The one place that touches backend libraries directly: versions, devices, gradients."""

from __future__ import annotations

import keras


def backend_info():
    """Lines describing the backend library version and its devices."""
    b = keras.config.backend()
    if b == "jax":
        import jax

        return [f"jax {jax.__version__}", f"devices: {', '.join(str(d) for d in jax.devices())}"]
    if b == "torch":
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return [f"torch {torch.__version__}", f"devices: cpu{', ' + ', '.join(cuda) if cuda else ''}"]
    if b == "tensorflow":
        import tensorflow as tf

        return [f"tensorflow {tf.__version__}",
                f"devices: {', '.join(d.name for d in tf.config.list_logical_devices())}"]
    return [f"backend {b}"]


def value_and_grad(fn, x):
    """``(fn(x), d sum(fn(x)) / dx)`` on the active backend (used by Grad-CAM)."""
    b = keras.config.backend()
    if b == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
            total = tf.reduce_sum(y)  # inside the tape, or the gradient is None
        return y, tape.gradient(total, x)
    if b == "jax":
        import jax

        y, vjp = jax.vjp(fn, x)
        return y, vjp(jax.numpy.ones_like(y))[0]
    if b == "torch":
        import torch

        x = torch.as_tensor(keras.ops.convert_to_numpy(x)).to(keras.ops.convert_to_tensor(0.0).device)
        x = x.detach().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        return y.detach(), g
    raise NotImplementedError(f"Grad-CAM has no gradient for backend {b!r}")
