"""``ktransfer``: the command-line interface (click). Parses options into configs, calls the library.

`common` holds the group and what the commands share; each other module registers a family of commands on it.
"""

from keras_transfer.cli import bench, catalog, results, runs  # noqa: F401  (register the commands)
from keras_transfer.cli.common import keep_freed_host_memory, main, resolve_config

__all__ = ["main", "keep_freed_host_memory", "resolve_config"]
