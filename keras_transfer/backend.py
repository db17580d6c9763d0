"""Facts and plumbing of the three backends through their public APIs: versions, devices, compilation
caches, host-to-device copies, gradients. Kernels and patches that replace Keras' own code are in
`keras_transfer.accel`; private symbols in `keras_transfer.internals`."""

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

        def take(idx):
            i = to_device(idx, device)
            return tuple(a[i] for a in on_device)

        return take
    raise NotImplementedError(f"device_gather has no {b!r} version; use host arrays")


def to_device(data, device):
    """Host data (a numpy array, or a torch tensor in host memory) as a torch tensor on ``device``,
    without waiting for the kernels queued there: a GPU copy goes through pinned memory with
    ``non_blocking`` (torch's caching host allocator keeps the pinned block until the copy is done),
    where ``torch.as_tensor(data, device="cuda")`` or ``.to("cuda")`` from pageable memory synchronise
    the stream (pytorch/pytorch#120996)."""
    import torch

    tensor, device = torch.as_tensor(data), torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def host_to_device(array):
    """A host array on the active backend's compute device without a host-device synchronisation
    (torch: `to_device`; JAX's ``device_put`` is asynchronous already); the array itself elsewhere."""
    b = keras.config.backend()
    if b == "torch":
        from keras_transfer.internals import torch_device

        return to_device(array, torch_device())
    if b == "jax":
        import jax

        return jax.device_put(array)
    return array


def import_tensorflow():
    """``import tensorflow``, for the tf.data pipeline. When `accel.syncs.defer_tensorflow_import` kept Keras from
    importing it, TensorFlow gets the global seed ``keras.utils.set_random_seed`` would have given it."""
    import sys

    first = "tensorflow" not in sys.modules
    from keras_transfer.logs import native_logs_quieted

    with native_logs_quieted():
        import tensorflow as tf

    if first and keras.config.backend() != "tensorflow":
        from keras_transfer.internals import global_seed

        seed = global_seed()
        if seed is not None:
            tf.random.set_seed(seed)
    return tf


class _RetracingFilter:
    """Drops TensorFlow's "triggered tf.function retracing" warnings (see `quiet_tensorflow_retracing`)."""

    @staticmethod
    def filter(record):
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_tensorflow_retracing():
    """Stop TensorFlow warning that Keras' predict function "triggered tf.function retracing".

    A fine-tuning run predicts with a new model per strategy (the linear probe's feature pass, each
    evaluation): every one is traced once, as it must be, and after five TensorFlow calls this misuse
    of ``tf.function`` in a loop, printing a paragraph on how to avoid it. Only that message is dropped,
    with a filter on the ``tensorflow`` logger; nothing is imported. Called by the ``ktransfer`` command.
    """
    import logging

    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _RetracingFilter) for f in logger.filters):
        logger.addFilter(_RetracingFilter())



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
