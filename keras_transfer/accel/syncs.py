"""Process-wide patches of Keras' torch backend that take host-device synchronisations out of a training
step (`avoid_device_syncs`), and the one that keeps Keras from importing TensorFlow only to ask whether it
is installed (`defer_tensorflow_import`). Installed by `keras_transfer.accel.install`; the private symbols
they replace are listed in `keras_transfer.internals`."""

from __future__ import annotations

import contextlib
import functools

import keras

from keras_transfer.accel.kernels import torch_eager
from keras_transfer.backend import to_device


class NoLongerMatches(RuntimeError):
    """A patch found Keras' code other than the code it was written for (a Keras upgrade)."""


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
    ours = _imported_tensorflow_class()
    if type(lazy) is module_utils.LazyModule:
        lazy.__class__ = ours
    elif type(lazy) is not ours:
        raise NoLongerMatches(f"keras.src.utils.module_utils.tensorflow: expected a LazyModule. "
                              f"Received: {type(lazy).__name__}")
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


_SYNC_FREE = {"installed": False, "on": True}


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
    (benchmarks/results/h100-torch-efficientnet_b0-224-bf16.md). The patches apply to the torch backend
    only, change no value, and step aside inside `stock_keras` (the plain-Keras side of ``ktransfer bench``).

    Returns:
        True when the patches are in place (torch). Raises `NoLongerMatches` where Keras' functions are no
        longer the ones they replace.
    """
    if keras.config.backend() != "torch":
        return False
    if _SYNC_FREE["installed"]:
        return True
    import sys

    from keras.src.backend.torch import core, random

    original = core.convert_to_tensor
    scalar = _scalar_to_tensor(original, core)
    modules = [module for name, module in list(sys.modules.items())
               if name.startswith("keras") and getattr(module, "convert_to_tensor", None) is original]
    if core not in modules or not callable(getattr(random, "torch_seed_generator", None)):  # checked before patching
        raise NoLongerMatches("keras.src.backend.torch: expected core.convert_to_tensor and "
                              "random.torch_seed_generator to patch. Received: not found as expected")
    for module in modules:
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



def follow_keras(yes):
    """With ``yes``, the installed patches run Keras' own code (`keras_transfer.accel.disable`)."""
    _SYNC_FREE["on"] = not yes
