"""TensorFlow's C++ log lines, kept off the terminal unless asked for.

TensorFlow 2.19 and later log through absl before anything calls ``absl::InitializeLog``, so their notices at
import (oneDNN, the CPU features it was built for, "All log messages before absl::InitializeLog() ...") reach
stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says (tensorflow/tensorflow#100442). Around the imports that load
TensorFlow, `native_logs_quieted` passes stderr's file descriptor through a pipe and a thread that forwards every
line as it comes, except informational and warning log lines (errors and fatal lines are kept, so an abort still
says why). ``KTRANSFER_VERBOSE=1`` (``ktransfer --verbose``) shows them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# absl / glog info and warning lines ("I0000 00:00:1796660353.198570   31014 port.cc:153] ..."), absl's notice
# about them, and the second line of TensorFlow's CPU-feature notice.
NATIVE_LOG_LINE = re.compile(rb"(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log messages before "
                             rb"absl::InitializeLog\(\) is called|To enable the following instructions: )")


def verbose():
    return os.environ.get("KTRANSFER_VERBOSE", "").strip().lower() in ("1", "true", "on", "yes")


def _forward(read_fd, out_fd):
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_LOG_LINE.match(line))
            if kept:
                os.write(out_fd, kept)
        if pending and not NATIVE_LOG_LINE.match(pending):
            os.write(out_fd, pending)


@contextlib.contextmanager
def native_logs_quieted():
    """Inside, what is written to file descriptor 2 reaches stderr as it comes, less TensorFlow's and absl's
    informational and warning log lines. Nothing changes with ``KTRANSFER_VERBOSE=1``, or where there is no file
    descriptor 2 or no pipe to be had."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (an embedding host): nothing to filter
        yield
        return
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        os.close(saved)
        yield
        return
    forwarder = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True)
    forwarder.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the forwarder reads to the end and stops
        forwarder.join(timeout=10)
        os.close(saved)
