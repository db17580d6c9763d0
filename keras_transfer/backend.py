"""The one place that touches backend libraries directly: versions, devices, gradients."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

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
        from keras.src.backend.torch.core import get_device

        return to_device(array, get_device())
    if b == "jax":
        import jax

        return jax.device_put(array)
    return array


def torch_eager():
    """True on the torch backend outside ``torch.compile``. Inside it (``jit_compile=True``) Inductor
    chooses layouts itself, as XLA does, and Keras' own ops are the ones to trace: the channels-last
    views below break Inductor's stride ordering once Dynamo makes spatial sizes symbolic."""
    if keras.config.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()


def fused_batch_norm(x, gamma, beta, epsilon, invstd=False):
    """Training-mode batch normalisation of a channels-last 4-D batch in one fused kernel.

    Returns ``(y, batch_mean, biased_batch_variance)``, or None where the backend has no such
    kernel to call (JAX and TensorFlow: XLA / grappler fuse Keras' own ops). The statistics are
    computed in float32, as Keras does for low-precision inputs; ``y`` keeps the input dtype. With
    ``invstd``, the third item is the kernel's own ``1 / sqrt(variance + epsilon)`` instead, for
    `move_batch_statistics`.
    """
    if keras.config.backend() != "torch":
        return None
    import torch

    v = x.permute(0, 3, 1, 2)  # an NHWC tensor is a channels_last NCHW view: no copy
    weight = None if gamma is None else gamma.value.float()
    bias = None if beta is None else beta.value.float()
    # A bfloat16 / float16 batch goes in as it is, with float32 parameters: torch's kernel accumulates
    # in float32 and writes the input dtype, so copying the activation to float32 and back (two more
    # passes over it, each way) gives the same numbers for more memory traffic.
    y, mean, inv = torch.native_batch_norm(v, weight, bias, None, None, True, 0.0, epsilon)
    if invstd:
        return y.permute(0, 2, 3, 1), mean.detach(), inv.detach()
    with torch.no_grad():
        variance = inv.pow(-2) - epsilon
    return y.permute(0, 2, 3, 1), mean.detach(), variance


# In this thread: .queue, the open `batched_statistics` block's queue or None; .queued, the ids of the
# moving-statistic tensors in it.
_PENDING = threading.local()


@contextlib.contextmanager
def batched_statistics():
    """Inside this block, `move_batch_statistics` queues its updates, and the block applies them as it
    closes, all layers' at once: on torch ``_foreach_`` operators (one multi-tensor kernel each on a
    GPU) instead of four small operators per BatchNormalization. A forward pass opens it
    (`models.graph`); nothing reads a moving statistic in a training pass, and a layer whose statistic
    is already queued (a layer called twice) first applies the queue, so each update sees the one
    before, as in Keras. Nested blocks join the outermost. If the block raises, the queued updates are
    dropped."""
    if getattr(_PENDING, "queue", None) is not None:
        yield
        return
    queue = _PENDING.queue = []
    _PENDING.queued = set()
    try:
        yield
    finally:
        _PENDING.queue = _PENDING.queued = None
    _apply_statistics(queue)


def move_batch_statistics(moving_mean, moving_variance, mean, invstd, epsilon, weight):
    """BatchNormalization's moving statistics moved toward a batch's, Keras' rule
    ``moving <- moving + weight * (batch - moving)`` with the biased batch variance
    ``invstd ** -2 - epsilon``, in place on the variables' own tensors (torch, outside ``torch.compile``
    and Keras' stateless scopes), queued inside `batched_statistics`. Returns False, having done
    nothing, anywhere else, for the caller to assign the new values Keras' way.

    Keras' ``variable.assign(variable * m + batch * (1 - m))`` takes ten ops on torch for the two
    statistics (two Python numbers made into tensors, four multiplications, two additions, two copies
    into the variables); on a GPU each is a kernel launch and host work in a step that is bound by host
    work. Here it is ``pow``, ``sub`` and one ``lerp_`` per statistic, or three ``_foreach_`` operators
    for a whole network. The values are Keras' rule up to rounding (``lerp`` is one fused expression).
    """
    if not torch_eager():
        return False
    import torch
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    values = [getattr(v, "_value", None) for v in (moving_mean, moving_variance)]
    if in_stateless_scope() or not all(isinstance(v, torch.Tensor) and not v.requires_grad for v in values):
        return False
    item = (values[0], values[1], mean, invstd, epsilon, weight)
    queue = getattr(_PENDING, "queue", None)
    if queue is None:
        _apply_statistics([item])
        return True
    queued = _PENDING.queued
    if id(values[0]) in queued or id(values[1]) in queued:
        _apply_statistics(queue)  # the same layer again: its first update goes first
        queue.clear()
        queued.clear()
    queue.append(item)
    queued.update((id(values[0]), id(values[1])))
    return True


def _apply_statistics(queue):
    import torch

    if not queue:
        return
    if len(queue) > 1 and len({q[0].device for q in queue}) > 1:  # _foreach_ operators take one device
        for item in queue:
            _apply_statistics([item])
        return
    with torch.no_grad():
        if len(queue) == 1:
            mm, mv, mean, invstd, epsilon, weight = queue[0]
            mm.lerp_(mean.to(mm.dtype), weight)
            mv.lerp_((invstd.pow(-2) - epsilon).to(mv.dtype), weight)
            return
        variances = torch._foreach_pow([q[3] for q in queue], -2)
        torch._foreach_sub_(variances, [q[4] for q in queue])
        groups = {}
        for (mm, mv, mean, _, _, weight), variance in zip(queue, variances):
            group = groups.setdefault(weight, ([], []))
            group[0].extend((mm, mv))
            group[1].extend((mean.to(mm.dtype), variance.to(mv.dtype)))
        for weight, (movings, targets) in groups.items():
            torch._foreach_lerp_(movings, targets, weight)


# The memory order, slowest dimension first, in which torch's channels-last convolution reads a Keras
# kernel once `conv2d` has permuted it: ``(out, h, w, in)``; depthwise ``(in, multiplier, h, w)``.
_KERNEL_ORDER = {False: (3, 0, 1, 2), True: (2, 3, 0, 1)}


def _strides(shape, order):
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim], step = step, step * shape[dim]
    return tuple(strides)


def _relay(variable, strides):
    """Give a Keras variable's torch tensor ``strides`` (same shape and values): a new Parameter."""
    import torch

    value = variable._value
    laid = torch.empty_strided(value.shape, strides, dtype=value.dtype, device=value.device)
    with torch.no_grad():
        laid.copy_(value)
    variable._value = torch.nn.Parameter(laid, requires_grad=value.requires_grad)


def channels_last_kernels(model, kernels):
    """Store convolution kernels in the memory order that `conv2d` hands torch (torch, eager), keeping
    their Keras shape ``(h, w, in, out)``; ``kernels``: ``(variable, depthwise)`` pairs of ``model``'s
    layers. Returns how many were re-laid.

    With Keras' layout each training step copies every kernel into channels-last order for the
    convolution, and the gradient, which comes back in that order, is copied again to the variable's
    layout before it is accumulated: three operators per convolution (243 of an EfficientNetB0 step's
    ~1,200; `benchmarks/torch_ops.py`). Laid out as torch reads them, the permuted kernel already is
    channels-last and the gradient already has the variable's strides, so both copies go; values,
    outputs and training are bit-identical (tested). Optimizer slots made from a re-laid variable
    (`add_variable_from_reference`: Adam's moments, EMA / Lookahead averages) take its strides, since
    torch's multi-tensor (``_foreach_``) kernels take their fast path only when corresponding tensors
    share strides. `train.compile_model` calls it before the optimizer builds; on a model whose
    optimizer is already built (`train.resume_state`: the loader builds it) it re-lays the slots Keras
    made from each kernel too, found by Keras' slot names (``<kernel path>_<slot>``). Elsewhere, and
    under ``torch.compile``, a no-op.
    """
    if not torch_eager():
        return 0
    relaid, laid = 0, []
    for variable, depthwise in kernels:
        value = variable._value
        if value.dim() != 4:
            continue
        want = _strides(value.shape, _KERNEL_ORDER[depthwise])
        if value.stride() != want:
            _relay(variable, want)
            relaid += 1
        laid.append((variable.path.replace("/", "_") + "_", tuple(value.shape), want))
    if relaid:  # torch modules list the variables' tensors; list the new ones
        for layer in model._flatten_layers(include_self=True, recursive=True):
            if hasattr(layer, "_torch_params"):
                layer._track_variables()
    optimizer = getattr(model, "optimizer", None)
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None:
            continue
        if not getattr(opt, "_slots_follow_layout", False):
            _slots_follow_layout(opt)
        if opt.built:
            for slot in opt.variables:
                value = getattr(slot, "_value", None)
                for prefix, shape, strides in laid:
                    if slot.name.startswith(prefix) and tuple(slot.shape) == shape and value.stride() != strides:
                        _relay(slot, strides)
                        break
    return relaid


def _slots_follow_layout(optimizer):
    original = optimizer.add_variable_from_reference

    def add_variable_from_reference(reference_variable, *args, **kwargs):
        variable = original(reference_variable, *args, **kwargs)
        ref, value = getattr(reference_variable, "_value", None), getattr(variable, "_value", None)
        if ref is not None and value is not None and ref.shape == value.shape and ref.stride() != value.stride():
            _relay(variable, ref.stride())
        return variable

    optimizer.add_variable_from_reference = add_variable_from_reference
    optimizer._slots_follow_layout = True


def conv2d(x, kernel, strides, padding, dilation_rate, depthwise=False, bias=None):
    """A channels-last 2-D convolution with a Keras-layout kernel (``(h, w, in / groups, out)``, or
    ``(h, w, in, multiplier)`` with ``depthwise``) and an optional ``bias`` (one per output channel),
    computed without layout copies; None where Keras' own op is the one to use (JAX and TensorFlow,
    whose compilers pick the layout themselves).

    Keras 3.15's torch ``conv`` makes the NCHW view of a channels-last input contiguous (a copy of the
    activation), then converts it back to channels_last memory (a second copy), and autograd records
    both; a contiguous NHWC tensor already is a channels_last NCHW view, which torch's convolution
    takes as it is. Same arithmetic otherwise, "same" padding included (split as TensorFlow does:
    the extra pixel on the bottom / right). The bias goes into torch's convolution rather than a
    broadcast add after it (one op less each way: its gradient comes out of the convolution's backward).
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
    if bias is not None:
        bias = keras.ops.convert_to_tensor(bias)
    y = F.conv2d(v, k, bias, tuple(strides), pad, tuple(dilation_rate), v.shape[1] // k.shape[1])
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


def spatial_mean(x, keepdims):
    """The mean over the two spatial axes of a channels-last floating-point 4-D batch, in its own dtype,
    or None where Keras' own op is the one to use (JAX and TensorFlow, whose compilers fuse the casts).

    Keras 3.15's torch ``mean`` casts a bfloat16 / float16 batch to float32 first and the mean back, and
    autograd records both casts: two passes over the whole activation forward, and a float32 gradient
    as large as it cast back in the backward pass (EfficientNet's squeeze-excite pools every block's
    widest activation). torch's own reduction accumulates low-precision inputs in float32 already, and
    rounds the result once, as Keras' cast back does."""
    if not torch_eager() or not x.dtype.is_floating_point:
        return None
    return x.mean((1, 2), keepdim=keepdims)


def defer_tensorflow_import():
    """On JAX and torch, stops Keras from importing TensorFlow only to ask whether it is installed.

    Keras 3.15 asks its lazy ``tensorflow`` module whether TensorFlow is ``available``, which imports it
    when installed, in ``keras.utils.set_random_seed`` (to seed it) and whenever it serialises a layer's
    configuration (to see whether a value is a ``tf.TensorShape``, ``DType`` or ``TypeSpec``): at the
    start of every run and at every checkpoint, on any backend. With TensorFlow installed beside JAX
    that import cost 1.2 s and 420 MB of host memory per process (``keras.utils.set_random_seed(0)``:
    1.16-1.18 s, peak RSS 744 MB against 325 MB). After this call the answer is yes only once
    TensorFlow has been imported (by the tf.data pipeline, through `import_tensorflow`): before that,
    no value can be a TensorFlow type and TensorFlow holds no random state, so nothing is lost. An
    explicit use (``tf.data``, a TensorFlow type in a saved configuration) still imports it.

    Returns:
        True when installed (JAX and torch backends).
    """
    if keras.config.backend() == "tensorflow":
        return False
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow  # the one object Keras' modules share as ``tf``
    if type(lazy) is module_utils.LazyModule:
        lazy.__class__ = _imported_tensorflow_class()
    return True


@functools.cache
def _imported_tensorflow_class():
    from keras.src.utils import module_utils

    class ImportedTensorFlow(module_utils.LazyModule):
        """Keras' lazy ``tensorflow`` module, available once something has imported TensorFlow."""

        @property
        def available(self):
            import sys

            return "tensorflow" in sys.modules and super().available

    return ImportedTensorFlow


def import_tensorflow():
    """``import tensorflow``, for the tf.data pipeline. When `defer_tensorflow_import` kept Keras from
    importing it, TensorFlow gets the global seed ``keras.utils.set_random_seed`` would have given it."""
    import sys

    first = "tensorflow" not in sys.modules
    from keras_transfer.logs import native_logs_quieted

    with native_logs_quieted():
        import tensorflow as tf

    if first and keras.config.backend() != "tensorflow":
        from keras.src.utils.rng_utils import get_random_seed

        seed = get_random_seed()
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


_SYNC_FREE = {"installed": False, "on": True}
_OFF = ("off", "0", "false", "no")


def avoid_device_syncs():
    """On torch, lets Keras' ops and random layers run without stopping the host until the GPU catches up.

    Keras 3.15's torch backend synchronises host and device in two places that run many times per
    training step:

    - ``convert_to_tensor`` of a Python number (``ops.multiply(x, 0.9)``, ``ops.clip(x, 0, 255)``,
      ``variable * momentum``, Adam's ``ops.cast(beta_1)``) builds it with ``torch.as_tensor(x,
      device=...)``: a host-to-device copy that waits for every kernel already queued
      (pytorch/pytorch#120996). Here a number becomes ``torch.full((), x, ...)``, which writes it on the
      device without a copy; the same dtype and value (anything ``torch.full`` refuses goes to Keras').
    - Every seeded random op (dropout with a noise shape, random flips and crops, RandAugment) draws its
      seed with ``int(state[0] + state[1])`` of a ``SeedGenerator`` whose state lives on the device: a
      device-to-host read, after a host-to-device copy of its increment. Here the state is also kept
      on the host (read from the device once, and again whenever anything but this function writes it:
      a changed tensor version) and advanced on the device with ``torch.arange``: the same seeds.

    Counted with `SyncCounter` (``benchmarks/torch_syncs.py``), per training step: EfficientNetB0 123
    copies and 10 reads, the residual CNN with the ``strong`` augmentation 190 and 16, airbench with
    ``translate`` 40 and 3; 0 and 0 with these patches and batches gathered on the device. On one H100
    they made the EfficientNetB0 step (224, bf16, batch 256) 1.13x faster: 2,013 against 1,779 img/s
    (benchmarks/README.md). The patches apply to the torch backend only, change no value,
    and step aside inside `stock_keras` (the plain-Keras side of ``ktransfer bench``); with
    ``KTRANSFER_SYNC_FREE=off`` they are not installed.

    Returns:
        True when the patches are in place.
    """
    if keras.config.backend() != "torch" or os.environ.get("KTRANSFER_SYNC_FREE", "on").lower() in _OFF:
        return False
    if _SYNC_FREE["installed"]:
        return True
    import sys

    from keras.src.backend.torch import core, random

    original = core.convert_to_tensor
    scalar = _scalar_to_tensor(original, core)
    for name, module in list(sys.modules.items()):
        if name.startswith("keras") and getattr(module, "convert_to_tensor", None) is original:
            module.convert_to_tensor = scalar
    random.torch_seed_generator = _host_seeded_generator(random.torch_seed_generator, core)
    _SYNC_FREE["installed"] = True
    return True


@contextlib.contextmanager
def stock_keras():
    """Inside, `avoid_device_syncs`' patches run Keras' own code (the plain-Keras side of ``ktransfer
    bench``)."""
    was, _SYNC_FREE["on"] = _SYNC_FREE["on"], False
    try:
        yield
    finally:
        _SYNC_FREE["on"] = was


class SyncCounter:
    """Counts the torch calls that make the host wait for a GPU, made on this thread inside `counting`.

    Two kinds: tensors made from host data directly on a device (``torch.as_tensor`` / ``torch.tensor``
    with a ``device``: a blocking copy) and device values read back by Python (``item``, ``tolist``,
    ``int(t)``, ``bool(t)``, ``numpy`` ...). On a CPU nothing waits, so the count is what would
    synchronise on a GPU. Used as ``with SyncCounter() as c:`` (wraps those torch functions until the
    block ends), counting inside ``with c.counting():`` blocks; ``c.copies`` and ``c.reads`` name each.
    """

    READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy")

    def __init__(self):
        import threading

        self.copies, self.reads, self._on, self._saved = [], [], 0, []
        self._thread = threading.get_ident

    def __enter__(self):
        import torch

        thread = self._thread()

        def creating(fn):
            def make(data, *args, **kwargs):
                if self._on and self._thread() == thread and not isinstance(data, torch.Tensor) \
                        and kwargs.get("device") is not None:
                    self.copies.append(type(data).__name__)
                return fn(data, *args, **kwargs)
            return make

        def reading(name, fn):
            def read(t, *args, **kwargs):
                if self._on and self._thread() == thread:
                    self.reads.append(name)
                return fn(t, *args, **kwargs)
            return read

        for owner, name, wrap in [(torch, "as_tensor", creating), (torch, "tensor", creating),
                                  *((torch.Tensor, n, functools.partial(reading, n)) for n in self.READS)]:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrap(getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self):
        self._on += 1
        try:
            yield self
        finally:
            self._on -= 1

    def reset(self):
        self.copies.clear()
        self.reads.clear()


def op_counter():
    """A context manager (torch only) whose ``counts``, a ``collections.Counter``, receives the name of every
    torch operator dispatched inside it (backward passes included) that is not a view: on a GPU each is
    a kernel launch, and host work in an eager step. Views (``permute``, ``detach`` ...) make no kernel.
    Its ``bytes`` Counter receives, per operator name, the bytes of the tensors each call reads and
    writes (inputs and outputs): the memory traffic of the operators that are bound by it, as most of a
    step's elementwise and normalisation kernels are on a GPU. A diagnostic, like `SyncCounter`;
    ``benchmarks/torch_ops.py`` counts a training step with it."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()
            self.bytes = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                name = func.overloadpacket.__name__
                self.counts[name] += 1
                self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                        if isinstance(t, torch.Tensor))
            return out

    return OpCounter()


def _scalar_to_tensor(original, core):
    import torch

    def convert_to_tensor(x, dtype=None, sparse=None, ragged=None):
        if _SYNC_FREE["on"] and isinstance(x, (bool, int, float)) and not sparse and not ragged:
            if dtype is not None:
                dt = core.to_torch_dtype(dtype)
            elif isinstance(x, bool):
                dt = torch.bool
            elif isinstance(x, int):
                dt = torch.int64 if x < -(2**31) or x >= 2**31 else torch.int32
            else:
                dt = core.to_torch_dtype(keras.config.floatx())
            try:
                return torch.full((), x, dtype=dt, device=core.get_device())
            except (RuntimeError, TypeError, OverflowError):
                pass  # e.g. 1e40 as float32: Keras' path gives inf; its result and errors stay Keras'
        elif _SYNC_FREE["on"] and isinstance(x, (list, tuple)) and 0 < len(x) <= 64 and torch_eager() \
                and all(type(v) in (int, float, bool) for v in x) and not sparse and not ragged:
            # e.g. a loss' ops.convert_to_tensor(ops.shape(values)): Keras' dtype rule, built on the host
            dt = core.to_torch_dtype(dtype or core.result_type(*(type(v) for v in x)))
            return to_device(torch.as_tensor(x, dtype=dt), core.get_device())
        return original(x, dtype=dtype, sparse=sparse, ragged=ragged)

    convert_to_tensor.__wrapped__ = original
    return convert_to_tensor


def _host_seeded_generator(original, core):
    import weakref

    import torch
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.random.seed_generator import SeedGenerator

    mirrors = weakref.WeakKeyDictionary()  # SeedGenerator -> (state tensor, its version, seed, counter)

    @torch.compiler.disable
    def torch_seed_generator(seed):
        if not _SYNC_FREE["on"] or core.get_device() == "meta" or in_stateless_scope():
            return original(seed)
        if isinstance(seed, int):  # Keras: the tensor [seed as int32, 0], then int(sum) & 0xFFFFFFFF
            return _generator(seed & 0xFFFFFFFF)
        if not isinstance(seed, SeedGenerator):
            return original(seed)  # None: Keras' global generator
        state = seed.state.value
        held = mirrors.get(seed)
        if held is None or held[0] is not state or held[1] != state._version:
            first, second = (int(v) for v in state.tolist())  # once, or after an outside write
        else:
            first, second = held[2], held[3]
        # SeedGenerator.next(ordered=True): the state moves on by (0, 1).
        seed.state.assign(state + torch.arange(2, dtype=state.dtype, device=state.device))
        now = seed.state.value
        mirrors[seed] = (now, now._version, first, second + 1)
        return _generator((first + second) & 0xFFFFFFFF)  # Keras: int(first + second) & 0xFFFFFFFF

    def _generator(value):
        generator = torch.Generator(device=core.get_device())
        generator.manual_seed(value)
        return generator

    torch_seed_generator.__wrapped__ = original
    return torch_seed_generator


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
