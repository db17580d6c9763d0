"""Error types whose message is shown to the user as a single line, and the range check of config values."""

import math


class KTransferError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits 2."""


class DataError(KTransferError):
    """A dataset is unknown, missing, corrupted or of the wrong shape."""


class ConfigError(KTransferError):
    """A configuration value, model name or strategy is invalid."""


def is_number(value, integer=False):
    """True for an int (``integer``) or a finite int or float, never a bool (``inf`` passed every range check
    of a learning rate and ended in NaN losses)."""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_ranges(section, obj, rules):
    """Raise a `ConfigError` for the first ``(key, test, expected)`` of ``rules`` whose test fails on
    ``obj.key``: out-of-range numbers are refused when the config is read, before any data or run
    directory (a batch size of 0 used to end in a ZeroDivisionError, a negative learning rate in a run)."""
    for key, test, expected in rules:
        value = getattr(obj, key)
        if not test(value):
            raise ConfigError(f"{section + '.' if section else ''}{key}: expected {expected}. Received: {value!r}")
