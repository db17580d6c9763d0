"""TensorFlow's C++ log lines, kept off the terminal unless asked for.

TensorFlow 2.19 and later log through absl before anything calls ``absl::InitializeLog``, so their notices at
import (oneDNN, the CPU features it was built for, "All log messages before absl::InitializeLog() ...") reach
stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says (tensorflow/tensorflow#100442). Around the imports that load
TensorFlow, `native_logs_quieted` sends stderr's file descriptor to a temporary file and writes back every line
that is not such a log line. ``KTRANSFER_VERBOSE=1`` (``ktransfer --verbose``) shows them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# absl / glog lines ("I0000 00:00:1796660353.198570   31014 port.cc:153] ..."), absl's notice about them, and the
# second line of TensorFlow's CPU-feature notice.
NATIVE_LOG_LINE = re.compile(r"(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log messages before "
                             r"absl::InitializeLog\(\) is called|To enable the following instructions: )")


def verbose():
    return os.environ.get("KTRANSFER_VERBOSE", "").strip().lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def native_logs_quieted():
    """Inside: what is written to file descriptor 2 is held back; at the end, every line but TensorFlow's and
    absl's own log lines is written to stderr. Nothing changes with ``KTRANSFER_VERBOSE=1``."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (an embedding host): nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
