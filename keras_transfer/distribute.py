"""Data-parallel training on the local devices, through Keras' own distribution API.

``--devices N`` (or ``all``) runs a stage under `keras.distribution.DataParallel`: the model's variables are
replicated on N devices, every batch is split across them, and XLA computes the step as one program over the
global batch, so BatchNorm's statistics and the gradients are those of the whole batch, as on one device. Keras
implements the distribution API for the JAX backend; on TensorFlow and torch ``--devices`` above 1 is refused.

Keras does not split a batch whose size the device count does not divide (keras-team/keras#21167): here every
batch is made divisible. A training epoch's ragged last batch is cut to a multiple of N (the images left out
change from epoch to epoch, as with ``data.drop_last``); the validation split is served the same way (at most
N - 1 images of it left out of the validation metrics); predictions (test metrics, cached features) pad the last
batch and drop the padding, so test metrics cover every image.

A stage resumes on another device count (a checkpoint holds plain arrays). Where the cut of the ragged batch
differs between the two counts, the epochs have another number of steps than the schedule was compiled for, so
the resumed run's learning rates drift from an uninterrupted one's; with a training set the device counts divide,
they are the same (tested: 1 -> 2 and 2 -> 1 devices).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from keras_transfer.errors import ConfigError


def parse_devices(value):
    """``N`` (an integer >= 1) or ``"all"``, from a flag or a config value; a `ConfigError` otherwise."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < 1 or isinstance(value, bool):
        raise ConfigError(f"--devices: expected a number of devices >= 1 or 'all'. Received: {value!r}")
    return n


def resolve_devices(value):
    """The number of devices ``value`` (`parse_devices`) asks for on this machine and backend, checked: more than
    one needs the JAX backend and that many local devices."""
    value = parse_devices(value)
    if value == 1:
        return 1
    backend = keras.config.backend()
    if backend != "jax":
        raise ConfigError(f"--devices {value}: data-parallel training uses keras.distribution, which Keras "
                          f"implements for the JAX backend: expected KERAS_BACKEND=jax or --devices 1. Received: "
                          f"KERAS_BACKEND={backend}")
    available = keras.distribution.list_devices()
    n = len(available) if value == "all" else value
    if n > len(available):
        raise ConfigError(f"--devices {value}: expected at most the {len(available)} local device(s) JAX sees "
                          f"({', '.join(map(str, available))}; on a CPU, XLA_FLAGS="
                          f"--xla_force_host_platform_device_count=N makes N). Received: {value}")
    return n


def check_batch_size(batch_size, n):
    if n > 1 and batch_size % n:
        raise ConfigError(f"data.batch_size: expected a multiple of the {n} devices (each takes an equal part of "
                          f"every batch). Received: {batch_size}")


@contextlib.contextmanager
def data_parallel(n):
    """Build and train inside this to replicate on the first ``n`` local devices (nothing changes for 1)."""
    if n == 1:
        yield
        return
    available = keras.distribution.list_devices()
    if len(available) < n:  # `resolve_devices` checks this for the command line; a Ray worker may see fewer
        raise ConfigError(f"--devices {n}: expected at most the {len(available)} local device(s) this process sees. "
                          f"Received: {n}")
    dist = keras.distribution.DataParallel(devices=available[:n])
    with dist.scope():
        yield


def device_count():
    """How many devices the current distribution splits a batch across (1 without one)."""
    dist = keras.distribution.distribution()
    if isinstance(dist, keras.distribution.DataParallel):
        return int(np.prod(dist.device_mesh.shape))
    return 1


def predict(model, x, batch_size=256):
    """``model.predict(x)`` on every image of ``x``, under the current distribution too: the last batch is
    padded to a multiple of the device count and the padding's outputs dropped."""
    n = device_count()
    pad = (-len(x)) % n
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    batch_size = max(n, batch_size - batch_size % n)
    out = model.predict(x, batch_size=batch_size, verbose=0)
    return out[:len(out) - pad] if pad else out
