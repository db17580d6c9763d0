"""Peak memory of a stretch of work: host (the process's resident set) and, where the backend reports it,
the accelerator's.

Host: Linux keeps the process's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``) and
resets it when ``5`` is written to ``/proc/self/clear_refs`` (Linux >= 4.0), so a stage that resets it at
its start reads its own peak at its end even when earlier stages in the process used more. Where the reset is
not allowed, the peak is the process's since it started (``scope: process``), which is still an upper
bound. Elsewhere ``resource.getrusage``'s ``ru_maxrss`` (process scope).

Device: torch's ``torch.cuda.max_memory_allocated`` and TensorFlow's ``get_memory_info(...)["peak"]``, both
reset at the start; JAX's ``Device.memory_stats()["peak_bytes_in_use"]``, which cannot be reset (process
scope). None on a CPU.
"""

from __future__ import annotations

import sys

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.as_dict()``: the peak host and device memory (MB)."""

    def __enter__(self):
        self.scope = "stage" if _reset_host_peak() else "process"
        self.device_scope = _reset_device_peak()
        return self

    def __exit__(self, *exc):
        self.host = peak_host_bytes()
        self.device = peak_device_bytes()
        return False

    def as_dict(self):
        mb = 1024 * 1024
        return {"peak_host_mb": round(self.host / mb, 1) if self.host else None,
                "peak_host_scope": self.scope,
                "peak_device_mb": round(self.device / mb, 1) if self.device else None,
                "peak_device_scope": self.device_scope if self.device else None}


def _reset_host_peak():
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_host_bytes():
    """The process's peak resident memory in bytes (since the last reset where one was made)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux
    except (ImportError, OSError):
        return None


def _backend():
    import keras

    return keras.config.backend()


def _reset_device_peak():
    """Reset the accelerator's peak counter where the backend can; the scope the next reading has."""
    backend = _backend()
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                return "stage"
        elif backend == "tensorflow" and "tensorflow" in sys.modules:
            import tensorflow as tf

            gpus = tf.config.list_logical_devices("GPU")
            if gpus:
                tf.config.experimental.reset_memory_stats(gpus[0].name)
                return "stage"
    except (RuntimeError, ValueError, AttributeError):
        pass
    return "process"


def peak_device_bytes():
    """Peak accelerator memory in bytes of the first device, or None on a CPU or where it is not reported."""
    backend = _backend()
    try:
        if backend == "torch":
            import torch

            return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        if backend == "tensorflow" and "tensorflow" in sys.modules:
            import tensorflow as tf

            gpus = tf.config.list_logical_devices("GPU")
            return int(tf.config.experimental.get_memory_info(gpus[0].name)["peak"]) if gpus else None
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform == "cpu":
                return None
            stats = device.memory_stats() or {}
            return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
    except (RuntimeError, ValueError, AttributeError, KeyError, IndexError):
        return None
    return None

