"""Readers for the official on-disk formats of the supported datasets.

Every reader returns uint8 images shaped ``(N, H, W, C)`` and int64 labels, and
raises `DataError` with a one-line message naming the file when a file is
truncated or malformed. Nothing here needs TensorFlow.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import tarfile
import zipfile

import numpy as np

from keras_transfer.errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip raises EOFError on truncation
        raise DataError(f"Could not read {path}: expected a complete "
                        f"{'gzip ' if opener is gzip.open else ''}file. Received: {e}") from e


def read_idx(path):
    """Read a (optionally gzipped) IDX file, as used by MNIST and EMNIST.

    Args:
        path: str. Path to an ``*-idx?-ubyte`` file, ``.gz`` or not.

    Returns:
        A numpy array whose shape is the one declared in the file header.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: expected magic 0x0000 + type byte. "
                        f"Received: {data[:4].hex() or 'empty file'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path} is truncated or padded: expected {expected} bytes for shape "
                        f"{shape}. Received: {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx_pair(images_path, labels_path, transpose=False, label_offset=0):
    """Read an IDX image/label pair into ``(x[N,H,W,1] uint8, y[N] int64)``.

    Args:
        images_path: str. IDX3 images file.
        labels_path: str. IDX1 labels file.
        transpose: bool. Swap H and W (EMNIST stores images transposed).
        label_offset: int. Subtracted from labels (EMNIST letters are 1..26).
    """
    x = read_idx(images_path)
    y = read_idx(labels_path).astype(np.int64) - label_offset
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"IDX pair mismatch: expected images (N,H,W) and labels (N,). "
                        f"Received: {x.shape} and {y.shape}")
    if transpose:
        x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x[..., None]), y


def read_cifar10_batches(paths):
    """Read CIFAR-10 python-format batches (pickled dicts) into NHWC uint8."""
    xs, ys = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data, labels = d[b"data"], d[b"labels"]
        except Exception as e:
            raise DataError(f"{p} is not a CIFAR-10 python batch: expected a pickled dict with "
                            f"b'data' and b'labels'. Received: {type(e).__name__}: {e}") from e
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{p}: expected data of shape (N, 3072). Received: {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def read_stl10_binary(images_path, labels_path=None):
    """Read STL-10 ``*_X.bin`` (column-major 3x96x96 per image) and ``*_y.bin`` (1..10)."""
    raw = np.frombuffer(_read_bytes(images_path), dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DataError(f"{images_path} is truncated: expected a multiple of 27648 bytes. "
                        f"Received: {raw.size}")
    # Column-major: each image is stored as (C, W, H); transpose to (H, W, C).
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    y = None
    if labels_path is not None:
        y = np.frombuffer(_read_bytes(labels_path), dtype=np.uint8).astype(np.int64) - 1
        if len(y) != len(x):
            raise DataError(f"{labels_path}: expected {len(x)} labels. Received: {len(y)}")
    return np.ascontiguousarray(x), y


def read_npz(path):
    """Read ``x`` (uint8 N,H,W[,C]), ``y`` (int) and optional ``class_names`` from an npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
            names = [str(n) for n in f["class_names"]] if "class_names" in f else None
    except KeyError as e:
        raise DataError(f"{path}: expected arrays 'x' and 'y'. Received: missing {e}") from e
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: expected an npz file with arrays x and y. Received: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
    if y.dtype.kind not in "iu" and not (y.dtype.kind in "fb" and y.size and np.all(np.mod(y, 1) == 0)):
        raise DataError(f"{path}: expected integer class labels y. Received: y {y.dtype}"
                        + (f" with values such as {y.ravel()[np.mod(y.ravel(), 1) != 0][:1].tolist()}"
                           if y.dtype.kind == "f" else ""))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: expected x uint8 (N,H,W,C) and y (N,). "
                        f"Received: x {x.dtype}{x.shape}, y {y.shape}")
    return x, y.astype(np.int64), names


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def list_image_folder(root):
    """Return ``(paths, labels, class_names)`` for a ``root/<class>/<image>`` tree."""
    if not os.path.isdir(root):
        raise DataError(f"Expected an image folder with one sub-folder per class. Received: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTS))
        if not files and any(os.listdir(os.path.join(root, d)) for d in classes):
            raise DataError(f"Expected images ({', '.join(IMAGE_EXTS)}) in every class folder of {root}. "
                            f"Received: class folder {c!r} has none")
        paths += [os.path.join(root, c, f) for f in files]
        labels += [i] * len(files)
    if not paths:
        raise DataError(f"Expected images ({', '.join(IMAGE_EXTS)}) in class sub-folders of {root}. "
                        f"Received: no images")
    return paths, np.asarray(labels, dtype=np.int64), classes


MAX_DEFAULT_SIDE = 256  # keras.utils.image_dataset_from_directory's default image_size
_GREY_MODES = ("1", "L", "LA")


def read_image_folder(root, channels=None, size=None):
    """Decode a ``root/<class>/<image>`` tree into arrays with Pillow.

    Args:
        root: str. The tree's root folder.
        channels: int or None. 1 (grey) or 3 (RGB); None: 1 when every image is grey, else 3.
        size: int, ``(height, width)`` or None. Every image is centre-cropped to this aspect ratio and
            resized to it (bilinear), as ``keras.utils.image_dataset_from_directory(...,
            crop_to_aspect_ratio=True)`` does. None keeps the images' own size when they all share one;
            otherwise each becomes a square whose side is the median of their shorter sides, at most
            `MAX_DEFAULT_SIDE`.

    Returns:
        ``(x, labels, class_names)``: uint8 ``(N, H, W, C)`` images, int64 labels, sorted class names.
    """
    paths, labels, classes = list_image_folder(root)
    headers = [_image_header(p) for p in paths]  # (width, height, mode); reads no pixels
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for _, _, mode in headers) else 3
    asked = size
    if isinstance(size, int):
        size = (size, size)
    elif size is None and len({(w, h) for w, h, _ in headers}) > 1:
        side = int(min(MAX_DEFAULT_SIDE, np.median([min(w, h) for w, h, _ in headers])))
        size = (side, side)
    height, width = size if size is not None else headers[0][1::-1]
    needed, limit = len(paths) * height * width * channels, _memory_limit()
    if limit and needed > limit:
        raise DataError(f"{root}: {len(paths)} images of {height}x{width}x{channels} need {needed / 2**30:.1f} GiB in "
                        f"memory; expected at most {limit / 2**30:.1f} GiB (half of this machine's memory). "
                        f"Received: {f'size {asked}' if asked else 'no --image-size (data.image_size)'}; "
                        f"pass a smaller one")
    x = np.empty((len(paths), height, width, channels), np.uint8)
    for i, p in enumerate(paths):
        x[i] = decode_image(p, channels, (height, width))
    # Trees whose file names are indices unique across classes (STL-10 here) keep that order,
    # which is the official one; others stay sorted by class then name.
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len(set(stems)) == len(stems):
        order = np.argsort([int(s) for s in stems], kind="stable")
        x, labels = x[order], labels[order]
    return x, labels, classes


def image_files(paths):
    """The image files among ``paths``, folders searched recursively (sorted), in the order given."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            found += sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files
                            if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise DataError(f"Expected image files or folders. Received: {p} does not exist")
    if not found:
        raise DataError(f"Expected images ({', '.join(IMAGE_EXTS)}). Received: none in {', '.join(paths)}")
    return found


def decode_image(path, channels, size=None):
    """One image file as uint8 ``(H, W, channels)``: grey (1) or RGB (3), and, given ``size`` ``(height,
    width)``, centre-cropped to its aspect ratio and resized to it (bilinear), as `read_image_folder` does."""
    from PIL import Image

    with _opened_image(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.crop(_centre_box(im.size, size[1], size[0])).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        x = np.asarray(im)
    return x.reshape(*x.shape[:2], channels)


def _memory_limit():
    """Half of the machine's physical memory in bytes, or None where it cannot be told."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


def _image_header(path):
    with _opened_image(path) as im:
        return im.size[0], im.size[1], im.mode


@contextlib.contextmanager
def _opened_image(path):
    """``PIL.Image.open(path)``, whose decoding errors, there or inside, become a one-line `DataError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"Could not decode {path}: expected a complete image file ({', '.join(IMAGE_EXTS)}). "
                        f"Received: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _centre_box(image_size, width, height):
    """The largest centred box of ``image_size`` (w, h) with the aspect ratio width : height, in whole
    pixels (as Keras' ``crop_to_aspect_ratio``)."""
    w, h = image_size
    crop_w, crop_h = max(min(w, int(h * width / height)), 1), max(min(h, int(w * height / width)), 1)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def _safe_members(names, dest):
    dest = os.path.realpath(dest)
    for n in names:
        target = os.path.realpath(os.path.join(dest, n))
        if not (target == dest or target.startswith(dest + os.sep)):
            raise DataError(f"Refusing to extract {n!r}: it escapes {dest}. "
                            f"Expected paths inside the archive root")


def extract_archive(archive, dest):
    """Extract a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` into ``dest`` once, safely.

    The archive is unpacked into a temporary sibling folder that is renamed to
    ``dest`` only when extraction succeeded, so an interrupted run leaves nothing.
    Members whose path would land outside ``dest`` (``..``, absolute paths, links)
    are refused.
    """
    if os.path.isdir(dest):
        return dest
    tmp = f"{dest}.partial-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist(), tmp)
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members([m.name for m in members], tmp)
                if any(m.issym() or m.islnk() or m.isdev() for m in members):
                    raise DataError(f"{archive}: links and device files are not allowed in a "
                                    f"dataset archive")
                t.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"Could not extract {archive}: expected a complete .tar.gz or .zip. "
                        f"Received: {type(e).__name__}: {e}") from e
    finally:
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest
