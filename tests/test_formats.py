import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from keras_transfer.data import formats
from keras_transfer.data.download import fetch
from keras_transfer.data.registry import load_dataset
from keras_transfer.errors import DataError


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr)
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def glyph():
    """A 28x28 'L' shape: a vertical bar on the left and a foot at the bottom (not symmetric)."""
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 6:9] = 255   # vertical stroke, left
    img[21:24, 6:20] = 255  # foot, bottom
    return img


def test_mnist_idx_upright_and_labels(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    imgs = np.stack([glyph(), 255 - glyph()])
    for split in ("train", "t10k"):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", imgs)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.array([3, 7], np.uint8))
    ds = load_dataset("mnist", str(tmp_path), download=False)
    assert ds.x_train.shape == (2, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.tolist() == [3, 7]
    # Upright: the stroke is on the left, the foot at the bottom.
    assert ds.x_train[0, 10, 7, 0] == 255 and ds.x_train[0, 22, 15, 0] == 255
    assert ds.x_train[0, 10, 20, 0] == 0


def test_emnist_letters_transposed_and_relabelled(tmp_path):
    d = tmp_path / "emnist_letters"
    d.mkdir()
    stored = glyph().T[None]  # official files store images transposed
    for split in ("train", "test"):
        write_idx(d / f"emnist-letters-{split}-images-idx3-ubyte.gz", stored)
        write_idx(d / f"emnist-letters-{split}-labels-idx1-ubyte.gz", np.array([1], np.uint8))
    ds = load_dataset("emnist_letters", str(tmp_path), download=False)
    np.testing.assert_array_equal(ds.x_train[0, :, :, 0], glyph())  # upright again
    assert ds.y_train.tolist() == [0] and ds.class_names[0] == "A" and ds.num_classes == 26


def test_truncated_idx_is_a_clear_error(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, np.zeros((3, 4, 4), np.uint8), gz=False)
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(DataError, match="truncated"):
        formats.read_idx(str(p))
    pg = tmp_path / "y-idx3-ubyte.gz"
    write_idx(pg, np.zeros((3, 4, 4), np.uint8))
    pg.write_bytes(pg.read_bytes()[:-10])
    with pytest.raises(DataError, match="Could not read"):
        formats.read_idx(str(pg))


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    img = np.zeros((32, 32, 3), np.uint8)
    img[0, 0] = (255, 0, 0)   # red top-left
    img[31, 0] = (0, 0, 255)  # blue bottom-left
    flat = img.transpose(2, 0, 1).reshape(1, -1)
    for name, label in [(f"data_batch_{i}", i % 10) for i in range(1, 6)] + [("test_batch", 9)]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": [label]}, f)
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.x_train.shape == (5, 32, 32, 3) and ds.y_train.tolist() == [1, 2, 3, 4, 5]
    assert tuple(ds.x_train[0, 0, 0]) == (255, 0, 0) and tuple(ds.x_train[0, 31, 0]) == (0, 0, 255)


def test_stl10_binary_column_major(tmp_path):
    d = tmp_path / "stl10"
    d.mkdir()
    img = np.zeros((96, 96, 3), np.uint8)
    img[5, 80] = (10, 20, 30)  # row 5, column 80
    raw = img.transpose(2, 1, 0).tobytes()  # official layout: channel, column, row
    for split in ("train", "test"):
        (d / f"{split}_X.bin").write_bytes(raw * 2)
        (d / f"{split}_y.bin").write_bytes(bytes([1, 10]))
    ds = load_dataset("stl10", str(tmp_path), download=False)
    assert ds.x_train.shape == (2, 96, 96, 3) and ds.y_train.tolist() == [0, 9]
    assert tuple(ds.x_train[0, 5, 80]) == (10, 20, 30)


def test_npz_and_folder_archive(tmp_path):
    from PIL import Image

    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for c, v in (("cat", 50), ("dog", 200)):
            (tree / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(tree / split / c / f"{i}.png")
    arch = tmp_path / "data" / "mydata"
    arch.mkdir(parents=True)
    with tarfile.open(arch / "images.tar.gz", "w:gz") as t:
        t.add(tree / "train", "train")
        t.add(tree / "test", "test")
    ds = load_dataset(f"folder:{arch}")
    assert ds.class_names == ["cat", "dog"] and ds.x_train.shape == (6, 6, 6, 3)
    assert ds.x_train[ds.y_train == 1].min() == 200
    np.savez(tmp_path / "d.npz", x=ds.x_train, y=ds.y_train)
    ds2 = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds2.num_classes == 2 and len(ds2.x_train) + len(ds2.x_test) == 6


def test_image_folder_of_mixed_sizes_and_modes(tmp_path):
    """Photos of different sizes and modes load: one channel count for the tree (RGB when any image is
    colour), centre-cropped (not squashed) to a square of the median shorter side, or to ``size``."""
    from PIL import Image

    from keras_transfer.data.formats import read_image_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((6, 6), 40, np.uint8)).save(tmp_path / "a" / "grey.png")
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :4] = wide[:, 12:] = 255  # outside the centred 8x8 square
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    Image.fromarray(np.full((10, 12, 3), (0, 100, 200), np.uint8)).save(tmp_path / "b" / "rgb.jpg", quality=100)
    Image.fromarray(np.full((30, 20), 7, np.uint8), "L").save(tmp_path / "b" / "tall.bmp")

    x, y, names = read_image_folder(str(tmp_path))
    assert names == ["a", "b"] and y.tolist() == [0, 0, 1, 1]
    assert x.shape == (4, 9, 9, 3)  # median of the shorter sides 6, 8, 10, 20
    assert (x[0] == 40).all() and x[1].max() == 0  # grey repeated to RGB; the wide one cropped, not squashed
    assert np.abs(x[2].astype(int) - (0, 100, 200)).max() <= 2 and (x[3] == 7).all()
    x16, _, _ = read_image_folder(str(tmp_path), size=(16, 4))
    assert x16.shape == (4, 16, 4, 3)
    assert read_image_folder(str(tmp_path), channels=1)[0].shape == (4, 9, 9, 1)

    same = tmp_path / "same" / "c"
    same.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((300, 400), i, np.uint8)).save(same / f"{i}.png")
    x, _, _ = read_image_folder(str(tmp_path / "same"))
    assert x.shape == (2, 300, 400, 1)  # one size: kept as it is, grey stays grey


def test_image_folder_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "c").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "c" / f"{i}.png")
    monkeypatch.setattr(formats, "_memory_limit", lambda: 3 * 40 * 50 * 3 - 1)
    with pytest.raises(DataError, match=r"3 images of 40x50x3 need .* GiB in memory.* no --image-size"):
        formats.read_image_folder(str(tmp_path))
    assert formats.read_image_folder(str(tmp_path), size=20)[0].shape == (3, 20, 20, 3)


@pytest.mark.parametrize("content", [b"not an image", b"GIF89a\x01", "truncated"])
def test_corrupted_image_in_a_folder_names_the_file(tmp_path, content):
    from PIL import Image

    from keras_transfer.data.formats import read_image_folder

    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "c" / "good.png")
    bad = tmp_path / "c" / "bad.jpg"
    if content == "truncated":  # a valid header, half the data
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:400])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match=r"Could not decode .*bad\.jpg: expected a complete image file"):
        read_image_folder(str(tmp_path))


def test_archive_path_escape_is_refused(tmp_path):
    arch = tmp_path / "evil.tar.gz"
    with tarfile.open(arch, "w:gz") as t:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="escapes"):
        formats.extract_archive(str(arch), str(tmp_path / "out"))
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"some bytes")
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DataError, match="Checksum mismatch"):
        fetch(src.as_uri(), str(dest), "0" * 64)
    assert os.listdir(tmp_path / "cache") == []
    import hashlib

    fetch(src.as_uri(), str(dest), hashlib.sha256(b"some bytes").hexdigest())
    assert dest.read_bytes() == b"some bytes"


def test_offline_error_names_files_and_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("stl10", str(tmp_path), download=True)
    msg = str(e.value)
    assert "train_X.bin" in msg and str(tmp_path / "stl10") in msg and "\n" not in msg


def test_failed_download_names_every_file_still_missing(tmp_path, monkeypatch):
    """Offline, the error lists all of a dataset's files not yet on disk, not only the first it tried."""
    import dataclasses

    from keras_transfer.data import registry

    spec = registry.REGISTRY["mnist"]
    unreachable = {f: ((tmp_path / "nowhere" / f).as_uri(), sha) for f, (_, sha) in spec.files.items()}
    monkeypatch.setitem(registry.REGISTRY, "mnist", dataclasses.replace(spec, files=unreachable))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"placed by hand")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", str(tmp_path))
    msg = str(e.value)
    assert ("Place train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in "
            f"{tmp_path / 'mnist'}") in msg and "\n" not in msg
    assert sorted(os.listdir(tmp_path / "mnist")) == ["train-labels-idx1-ubyte.gz"]


def test_unknown_dataset():
    with pytest.raises(DataError, match="Unknown dataset.*Received: 'nope'"):
        load_dataset("nope")


def test_embedded_datasets():
    ds = load_dataset("digits")
    assert ds.image_shape == (8, 8, 1) and len(ds.x_train) + len(ds.x_test) == 1797 and ds.x_train.max() == 255
    m = load_dataset("mnist_5k")
    assert m.image_shape == (28, 28, 1) and len(m.x_train) == 4000 and len(m.x_test) == 1000
    assert np.bincount(m.y_test).tolist() == [100] * 10


def test_digits28_draws_the_8x8_digits_as_mnist_draws_its_digits():
    """The same images and labels as ``digits``, upsampled into MNIST's 20x20 box and centred by mass in 28x28."""
    from scipy import ndimage

    d, d28 = load_dataset("digits"), load_dataset("digits28")
    assert d28.image_shape == (28, 28, 1) and d28.x_train.dtype == np.uint8
    np.testing.assert_array_equal(d28.y_train, d.y_train)
    np.testing.assert_array_equal(d28.y_test, d.y_test)
    ink = d28.x_train[..., 0] > 64
    rows = [np.flatnonzero(r.any(1)) for r in ink]
    heights = [r[-1] - r[0] + 1 for r in rows if len(r)]
    assert 18 <= np.mean(heights) <= 22  # MNIST's digits: 20 px high
    x = d28.x_train[..., 0].astype("float64")
    border = x[:, :2].sum() + x[:, -2:].sum() + x[:, :, :2].sum() + x[:, :, -2:].sum()
    assert border < 0.01 * x.sum()  # a (nearly) blank margin, as MNIST's
    centres = np.array([ndimage.center_of_mass(x[..., 0].astype("float64")) for x in d28.x_test[:50]])
    np.testing.assert_allclose(centres, 13.5, atol=0.6)
