"""Checksummed downloads into the dataset cache, with a clear offline error."""

from __future__ import annotations

import hashlib
import os
import urllib.request

from keras_transfer.errors import DataError


def default_data_dir():
    """``$KTRANSFER_DATA_DIR`` or ``~/.keras/datasets/keras_transfer``."""
    return os.environ.get("KTRANSFER_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".keras", "datasets", "keras_transfer")


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, dest, sha256, timeout=30, place=None):
    """Download ``url`` to ``dest`` through a temp file renamed only after the sha256 matches.

    Args:
        url: str. Source address.
        dest: str. Final path; its folder is created.
        sha256: str. Expected hex digest of the downloaded bytes.
        place: list of str or None. The file names the offline error asks the user to place in
            ``dest``'s folder (default: ``dest``'s own), e.g. every file of a dataset still missing.

    Raises:
        DataError: on a network failure (nothing is left behind) or a checksum
            mismatch (the partial file is removed).
    """
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}"
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except OSError as e:
            raise DataError(f"Could not download {url} ({type(e).__name__}: {e}). Offline? Place "
                            f"{', '.join(place or [os.path.basename(dest)])} in {os.path.dirname(dest)}") from e
        got = sha256_of(tmp)
        if got != sha256:
            raise DataError(f"Checksum mismatch for {url}: expected sha256 {sha256}. Received: {got}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest
