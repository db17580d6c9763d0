"""The one place that touches backend libraries directly: versions, devices, gradients."""

from __future__ import annotations

import os

import keras


def cache_root():
    """``$KTRANSFER_CACHE_DIR``, default ``~/.cache/keras_transfer``."""
    return os.environ.get("KTRANSFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "keras_transfer")


def enable_compilation_cache(path=None):
    """Keep compiled programs on disk, so a second run of the same model skips most compilation.

    JAX: its persistent compilation cache (XLA executables keyed by program, devices and flags).
    torch: Inductor's FX-graph and kernel caches under the same folder. TensorFlow: XLA's
    persistent cache directory, when set before TensorFlow compiles its first cluster.

    Args:
        path: str or None. Cache folder; default ``$KTRANSFER_COMPILE_CACHE`` or
            ``<cache root>/compile``. ``$KTRANSFER_COMPILE_CACHE=off`` turns the cache off.

    Returns:
        The folder used, or None when off.
    """
    path = path or os.environ.get("KTRANSFER_COMPILE_CACHE") or os.path.join(cache_root(), "compile")
    if path.lower() in ("off", "0", "none", "false"):
        return None
    b = keras.config.backend()
    folder = os.path.join(path, b)
    os.makedirs(folder, exist_ok=True)
    if b == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    elif b == "torch":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", folder)
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    elif b == "tensorflow":
        flag = f"--tf_xla_persistent_cache_directory={folder}"
        if "tf_xla_persistent_cache_directory" not in os.environ.get("TF_XLA_FLAGS", ""):
            os.environ["TF_XLA_FLAGS"] = (os.environ.get("TF_XLA_FLAGS", "") + " " + flag).strip()
    return folder


def has_accelerator():
    """Whether the active backend computes on a GPU/TPU (not the CPU)."""
    b = keras.config.backend()
    if b == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if b == "torch":
        import torch

        return torch.cuda.is_available()
    if b == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return False


def device_gather(*arrays):
    """Copies ``arrays`` to the compute device once; returns ``take(indices) -> tuple`` of device rows.

    The in-memory input path's accelerator fast path: a batch is then a gather on the device
    (microseconds) instead of a host gather plus a host-to-device copy per step (milliseconds for
    a 224x224 batch of 256, a large share of an EfficientNet step on an H100). JAX and torch only:
    on TensorFlow in-memory batches already run as a tf.data pipeline.
    """
    b = keras.config.backend()
    if b == "jax":
        import jax

        on_device = [jax.device_put(a) for a in arrays]
        gather = jax.jit(lambda a, i: a[i])
        return lambda idx: tuple(gather(a, idx.astype("int32")) for a in on_device)
    if b == "torch":
        import torch

        device = keras.ops.convert_to_tensor(0.0).device
        on_device = [torch.as_tensor(a).to(device) for a in arrays]
        return lambda idx: tuple(a[torch.as_tensor(idx).to(device)] for a in on_device)
    raise NotImplementedError(f"device_gather has no {b!r} version; use host arrays")


def torch_eager():
    """True on the torch backend outside ``torch.compile``. Inside it (``jit_compile=True``) Inductor
    chooses layouts itself, as XLA does, and Keras' own ops are the ones to trace: the channels-last
    views below break Inductor's stride ordering once Dynamo makes spatial sizes symbolic."""
    if keras.config.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()


def fused_batch_norm(x, gamma, beta, epsilon):
    """Training-mode batch normalisation of a channels-last 4-D batch in one fused kernel.

    Returns ``(y, batch_mean, biased_batch_variance)``, or None where the backend has no such
    kernel to call (JAX and TensorFlow: XLA / grappler fuse Keras' own ops). The statistics are
    computed in float32, as Keras does for low-precision inputs; ``y`` keeps the input dtype.
    """
    if keras.config.backend() != "torch":
        return None
    import torch

    v = x.permute(0, 3, 1, 2)  # an NHWC tensor is a channels_last NCHW view: no copy
    dtype = v.dtype
    weight = None if gamma is None else gamma.value.float()
    bias = None if beta is None else beta.value.float()
    y, mean, invstd = torch.native_batch_norm(v.float(), weight, bias, None, None, True, 0.0, epsilon)
    with torch.no_grad():
        variance = invstd.pow(-2) - epsilon
    return y.to(dtype).permute(0, 2, 3, 1), mean.detach(), variance


def conv2d(x, kernel, strides, padding, dilation_rate, depthwise=False):
    """A channels-last 2-D convolution with a Keras-layout kernel (``(h, w, in / groups, out)``, or
    ``(h, w, in, multiplier)`` with ``depthwise``), computed without layout copies; None where Keras'
    own op is the one to use (JAX and TensorFlow, whose compilers pick the layout themselves).

    Keras 3.15's torch ``conv`` makes the NCHW view of a channels-last input contiguous (a copy of the
    activation), then converts it back to channels_last memory (a second copy), and autograd records
    both; a contiguous NHWC tensor already is a channels_last NCHW view, which torch's convolution
    takes as it is. Same arithmetic otherwise, "same" padding included (split as TensorFlow does:
    the extra pixel on the bottom / right).
    """
    if not torch_eager():
        return None
    import torch
    import torch.nn.functional as F

    kernel = keras.ops.convert_to_tensor(kernel)
    if depthwise:  # (h, w, c, m) -> (h, w, 1, c * m) with c groups, as Keras' depthwise_conv
        kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], 1, -1)
    v = x.permute(0, 3, 1, 2)
    k = kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    pad = 0
    if padding == "same":
        pads = []
        for n, size, s, d in zip(v.shape[2:], k.shape[2:], strides, dilation_rate):
            total = max((-(-n // s) - 1) * s + (size - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        if all(a == b for a, b in pads):
            pad = [a for a, _ in pads]
        else:
            v = F.pad(v, (*pads[1], *pads[0]))
    y = F.conv2d(v, k, None, tuple(strides), pad, tuple(dilation_rate), v.shape[1] // k.shape[1])
    return y.permute(0, 2, 3, 1)


def max_pool2d(x, pool_size, strides, padding):
    """Channels-last 2-D max pooling without Keras' layout copy (torch; "valid" padding), or None
    where Keras' own op is the one to use. Keras' torch ``max_pool`` makes the NCHW view contiguous
    (a copy) and returns an NCHW-ordered result, whose layout the next layers then copy back."""
    if not torch_eager() or padding != "valid":
        return None
    import torch.nn.functional as F

    return F.max_pool2d(x.permute(0, 3, 1, 2), tuple(pool_size), tuple(strides)).permute(0, 2, 3, 1)


def zero_pad2d(x, padding):
    """Zero padding of a channels-last 4-D batch, ``padding = ((top, bottom), (left, right))``, or None
    where Keras' own op is the one to use (JAX and TensorFlow trace it once). Keras 3.15's ``ops.pad``
    builds an ``Operation`` object on every call (signature inspection and tree walks, about 1 ms of host
    time), which on torch happens every step."""
    if not torch_eager():
        return None
    import torch.nn.functional as F

    (top, bottom), (left, right) = padding
    return F.pad(x, (0, 0, left, right, top, bottom))


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
