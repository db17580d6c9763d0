"""The torch fast path, behind one door: everything that replaces Keras' code or calls torch kernels directly.

On torch nothing traces the forward pass, so Keras 3's per-layer Python, its layout copies and its host-device
synchronisations are paid on every step; `apply` removes them from a model (same values, tested against
Keras' own path): fast ``call`` methods for six layer types (`accel.layers`), direct layer calls through the
functional graph (`accel.graph`), convolution kernels laid out as torch reads them (`accel.kernels`), and,
once per process, Keras' Python numbers and seeds made without synchronising (`accel.syncs`). On JAX and
TensorFlow, whose compilers fuse and lay out these ops themselves, it only defers TensorFlow's import.

It relies on private Keras and torch symbols (`keras_transfer.internals`, tested row by row), so it is on
only where it was tested:

- the ``ktransfer`` command reads ``KTRANSFER_ACCEL``: ``auto`` (the default) is on with a Keras version in
  `TESTED_KERAS` and off, saying so once, with any other; ``on`` tries it with any Keras that has every
  symbol it needs; ``off`` runs Keras' own code;
- library code is off until it calls `enable`.

A model it was applied to saves as Keras' own layers (the fast calls are instance attributes).
"""

from __future__ import annotations

import os
import sys

import keras

from keras_transfer.errors import ConfigError

TESTED_KERAS = ("3.15.1",)
ENV = "KTRANSFER_ACCEL"
MODES = ("auto", "on", "off")

_STATE = {"mode": "off", "on": None, "said": set()}  # on: None until `install` has decided


def _say_once(line):
    """``line`` on stderr, once per process, on torch (elsewhere the fast path only defers TensorFlow's import)."""
    if line not in _STATE["said"] and keras.config.backend() == "torch":
        _STATE["said"].add(line)
        print(f"keras-transfer: {line}", file=sys.stderr)


def mode_from_environment():
    """``$KTRANSFER_ACCEL`` as one of `MODES` (unset: ``auto``); any other value is a one-line `ConfigError`."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    value = aliases.get(value, value)
    if value not in MODES:
        raise ConfigError(f"{ENV}: expected one of {', '.join(MODES)}. Received: {os.environ.get(ENV)!r}")
    return value


def configure(mode):
    """Set the mode (`MODES`) for this process; the patches are installed by the first `install` / `apply`."""
    if mode not in MODES:
        raise ConfigError(f"accel mode: expected one of {', '.join(MODES)}. Received: {mode!r}")
    _STATE["mode"], _STATE["on"] = mode, None


def mode():
    """The mode this process was configured with (`MODES`; ``off`` until `configure` or `enable`)."""
    return _STATE["mode"]


def enable(force=False):
    """Turn the fast path on for this process (library code; the ``ktransfer`` command does it by default).

    Args:
        force: bool. Also with a Keras version it was not tested with (where it has every symbol it needs).

    Returns:
        Whether it is on; when not, a line on stderr has said why.
    """
    configure("on" if force else "auto")
    return install()


def disable():
    """Turn it off: models built afterwards run Keras' own code, and so do Keras' numbers and seeds."""
    configure("off")
    install()


def enabled():
    """Whether the fast path is on (deciding it, and installing the patches, on first use)."""
    return install()


def install():
    """Decide, once per mode, whether the fast path is on, and install the process-wide patches if so.

    Returns:
        Whether it is on.
    """
    if _STATE["on"] is not None:
        return _STATE["on"]
    from keras_transfer.accel import syncs

    on = _STATE["mode"] != "off" and _usable(_STATE["mode"])
    if on:
        try:
            syncs.defer_tensorflow_import()
            syncs.avoid_device_syncs()
        except syncs.NoLongerMatches as e:
            _say_once(f"the torch fast path is off: {e}")
            on = False
    syncs.follow_keras(not on)  # patches installed by an earlier decision run Keras' code while it is off
    _STATE["on"] = on
    return on


def _usable(mode):
    version = keras.__version__
    if mode == "auto" and version not in TESTED_KERAS:
        _say_once(f"the torch fast path is off: it was tested with Keras {', '.join(TESTED_KERAS)}, this is "
                  f"Keras {version} ({ENV}=on tries it, {ENV}=off silences this)")
        return False
    from keras_transfer import internals

    try:
        gone = internals.missing(prefix="accel")
    except Exception as e:  # noqa: BLE001 - a probe Keras no longer builds: off, and say why
        gone = [f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"]
    if gone:
        _say_once(f"the torch fast path is off: Keras {version} lacks {len(gone)} private symbol(s) it needs "
                  f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})")
        return False
    return True


def describe():
    """One line: the mode and whether the fast path is on, for ``ktransfer info``."""
    on = install()
    where = "" if keras.config.backend() == "torch" else " (it acts on torch only)"
    return f"{'on' if on else 'off'}{where}; {ENV}={mode()}, Keras {keras.__version__}, tested with " \
           f"{', '.join(TESTED_KERAS)}"


def apply(model):
    """The one entry point of the training code: ``model`` with the fast path where it is on (in place;
    a no-op off torch, and where it is off). Call after ``compile`` (the optimizer is not built yet, so
    its slots follow the kernels' layout) or after loading a saved model; again after a change of a
    layer's dtype policy. Returns ``model``."""
    if not install() or keras.config.backend() != "torch":
        return model
    from keras_transfer.accel import graph, layers

    layers.fast_calls(model)
    graph.use_direct_calls(model)
    layers.channels_last_kernels(model)
    return model
