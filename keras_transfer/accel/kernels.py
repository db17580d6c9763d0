"""torch kernels called directly, in place of Keras 3's torch ops, where those copy memory layouts or
launch more operators than the arithmetic needs. Every function returns None (or False, or 0) where Keras'
own op is the one to use: off torch, and inside ``torch.compile``. Part of `keras_transfer.accel`: the
private symbols these rely on are listed in `keras_transfer.internals`."""

from __future__ import annotations

import contextlib
import threading

import keras

from keras_transfer import internals


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
    (`accel.graph`); nothing reads a moving statistic in a training pass, and a layer whose statistic
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
    share strides. `keras_transfer.accel.apply` calls it before the optimizer builds; on a model whose
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
        for layer in internals.flatten_layers(model):
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

