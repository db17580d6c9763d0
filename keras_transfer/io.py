"""Atomic file writes and run directories: nothing is half-written or silently overwritten."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from keras_transfer.errors import KTransferError


def atomic_write_bytes(path, data):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every result private to its writer
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, set | tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_model(model, path, extra=None):
    """``model.save`` to a temp ``.keras`` beside ``path``, then rename.

    ``extra``: ``{name: bytes or str}`` written into the same archive (under ``ktransfer/``), so they are
    replaced together with the model or not at all (`read_model_extra`); Keras' loader ignores them.
    """
    import zipfile

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        model.save(tmp)
        if extra:
            with zipfile.ZipFile(tmp, "a") as z:
                for name, data in extra.items():
                    z.writestr(f"{EXTRA_DIR}/{name}", data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


EXTRA_DIR = "ktransfer"


def read_model_extra(path, name):
    """The bytes `save_model` wrote as ``extra[name]`` into the ``.keras`` file ``path``, or None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.read(f"{EXTRA_DIR}/{name}")
    except (KeyError, OSError, zipfile.BadZipFile):
        return None


def load_model(path):
    """``keras.saving.load_model`` with every keras-transfer custom object registered first.

    The backbone modules are imported lazily by the model registry, so a fresh process that
    only loads a saved model would otherwise not know ``FreezableSpatialDropout2D`` & co.
    """
    import keras

    import keras_transfer.data.augment  # noqa: F401  (registers the custom layers and losses)
    import keras_transfer.methods  # noqa: F401
    import keras_transfer.models.airbench  # noqa: F401
    import keras_transfer.models.classifier  # noqa: F401
    import keras_transfer.models.legacy  # noqa: F401  (names saved by versions before 0.2)
    import keras_transfer.models.resnet  # noqa: F401
    import keras_transfer.optim  # noqa: F401  (the loss)

    return keras.saving.load_model(path)


def save_figure(fig, path, dpi=110):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def check_output(out, overwrite=False, kind="directory", flag="--out"):
    """Refuse an output path before anything is computed, written or moved, in one line: an existing result
    (a non-empty directory, an existing file) unless ``overwrite``; a file where a directory is expected or
    the reverse; a path below a file; a folder that cannot be written (the nearest existing one must be a
    writable directory). ``kind``: ``directory`` or ``file``. Returns ``out``."""
    if out is None:
        return out
    if kind == "directory":
        if os.path.exists(out) and not os.path.isdir(out):
            raise KTransferError(f"Expected a directory for {flag}. Received: {out} is a file")
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise KTransferError(f"{out} exists and is not empty: expected a new or empty directory for {flag} "
                                 f"(pass --overwrite to move it aside). Received: {flag} {out}")
    else:
        if os.path.isdir(out):
            raise KTransferError(f"Expected a file path for {flag}. Received: {out} is a directory")
        if os.path.exists(out) and not overwrite:
            raise KTransferError(f"{out} exists: expected a new file for {flag} (pass --overwrite to move it "
                                 f"aside). Received: {flag} {out}")
    parent = os.path.abspath(out if kind == "directory" and os.path.isdir(out) else os.path.dirname(
        os.path.abspath(out)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise KTransferError(f"Expected {flag} in a directory. Received: {out} lies below the file {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or _read_only_fs(parent):
        raise KTransferError(f"Expected a writable place for {flag}. Received: {out} ({parent} cannot be written)")
    return out


def _read_only_fs(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY) or os.path.realpath(path).startswith(("/proc", "/sys"))
    except OSError:
        return True


def move_aside(path):
    """Move an existing ``path`` to ``<path>.old-<timestamp>`` (never deleted); returns the new name or None."""
    if not os.path.lexists(path):
        return None
    base = path.rstrip(os.sep)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = f"{base}.old-{stamp}", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{base}.old-{stamp}-{n}"
    shutil.move(path, aside)
    return aside


_CREATED = {}  # run directory -> the folders new_run_dir created for it, deepest first
_MOVED = {}  # run directory -> where new_run_dir moved the earlier result it held (--overwrite)


def restore_moved(out):
    """Put back the earlier result `new_run_dir` moved aside for ``out`` (``out`` must be empty): a run that stopped
    at a bad input before writing a result leaves the earlier one where it was. Returns whether it did."""
    aside = _MOVED.pop(os.path.abspath(out), None)
    if aside is None or not os.path.isdir(aside) or (os.path.isdir(out) and os.listdir(out)):
        return False
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(aside, out)
    return True


def remove_created(out):
    """Remove the folders `new_run_dir` created for ``out`` (its parents included, e.g. ``runs/``), deepest first,
    as far as they are empty: what a run that stopped at a bad input leaves behind."""
    for d in _CREATED.pop(os.path.abspath(out), []):
        if not os.path.exists(d):
            continue
        try:
            os.rmdir(d)
        except OSError:
            break


def new_run_dir(out, kind, overwrite=False):
    """Create the run directory: ``out`` if given, else ``runs/<kind>-<timestamp>``.

    An existing non-empty directory is refused unless ``overwrite``, in which case
    it is moved aside to ``<dir>.old-<timestamp>`` rather than deleted.
    """
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{kind}-{stamp}")
        n = 1
        while os.path.exists(out):
            n += 1
            out = os.path.join("runs", f"{kind}-{stamp}-{n}")
    check_output(out, overwrite)
    if os.path.isdir(out) and os.listdir(out):
        _MOVED[os.path.abspath(out)] = move_aside(out)
    created, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    _CREATED[os.path.abspath(out)] = created
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise KTransferError(f"Expected a writable place for --out. Received: {out} ({e.strerror})") from None
    return out
