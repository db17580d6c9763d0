"""Error types whose message is shown to the user as a single line."""


class KTransferError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits 2."""


class DataError(KTransferError):
    """A dataset is unknown, missing, corrupted or of the wrong shape."""


class ConfigError(KTransferError):
    """A configuration value, model name or strategy is invalid."""
