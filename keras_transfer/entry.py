"""The ``ktransfer`` entry point: checks the backend Keras would load before anything imports Keras.

Keras reads ``KERAS_BACKEND`` (else ``backend`` in ``$KERAS_HOME/keras.json``, default ``~/.keras``; else
TensorFlow) when it is first imported, and an unknown or uninstalled backend ends in a long traceback from
inside that import. Here it is one line that names the installed backends and how to pick one, exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

SUPPORTED = ("jax", "tensorflow", "torch")


def installed_backends():
    return [b for b in SUPPORTED if importlib.util.find_spec(b) is not None]


def configured_backend():
    """``(backend, where it was set)`` as Keras will read it."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path) as f:
            backend = json.load(f).get("backend")
        if backend:
            return backend, path
    except (OSError, ValueError, AttributeError):
        pass
    return "tensorflow", "Keras' default (KERAS_BACKEND unset)"


def backend_error():
    """The one-line error for a backend Keras cannot load, or None."""
    backend, where = configured_backend()
    installed = installed_backends()
    hint = (f"set KERAS_BACKEND to one of the installed backends, e.g. KERAS_BACKEND={installed[0]} ktransfer ..."
            if installed else "install one: pip install 'keras-transfer[jax]' (or [tensorflow], [torch])")
    if backend not in SUPPORTED:
        return (f"Unknown Keras backend: expected one of {', '.join(SUPPORTED)} (installed: "
                f"{', '.join(installed) or 'none'}). Received: {where}={backend!r}")
    if backend not in installed:
        return (f"The {backend} backend is not installed: {hint}. Received: {where} -> {backend} "
                f"(installed: {', '.join(installed) or 'none'})")
    return None


def main():
    # TensorFlow's C++ notices (CPU features, oneDNN, large allocations) would bury the package's own lines:
    # quiet unless the user asks (TF_CPP_MIN_LOG_LEVEL=0).
    from keras_transfer.logs import native_logs_quieted, verbose

    if "--verbose" in sys.argv[1:2]:  # ktransfer --verbose COMMAND: TensorFlow's own log lines too
        os.environ["KTRANSFER_VERBOSE"] = "1"
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    error = backend_error()
    if error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)
    with native_logs_quieted():  # the TensorFlow backend loads TensorFlow here, with Keras
        from keras_transfer.cli import main as cli_main

    cli_main()
