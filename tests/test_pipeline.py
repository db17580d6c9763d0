import importlib.util
import os

import numpy as np
import pytest

from keras_transfer.data.pipeline import ArrayBatches, choose_input_path, tf_dataset
from tests.conftest import python_prints_ok, tiny_data


def test_array_batches_cover_each_epoch_and_are_seeded():
    x, y = tiny_data(50)
    b = ArrayBatches(x, y, 16, shuffle=True, seed=1)
    seen = np.concatenate([b[i][1] for i in range(len(b))])
    assert len(b) == 4 and sorted(seen.tolist()) == sorted(y.tolist())
    first = [b[i][0].copy() for i in range(len(b))]
    b.on_epoch_end()
    second = [b[i][0] for i in range(len(b))]
    assert any(not np.array_equal(a, c) for a, c in zip(first, second))
    resumed = ArrayBatches(x, y, 16, shuffle=True, seed=1, initial_epoch=1)
    for i in range(len(b)):
        np.testing.assert_array_equal(resumed[i][0], second[i])


def test_memory_and_tfdata_paths_give_identical_batches():
    pytest.importorskip("tensorflow")

    x, y = tiny_data(40)
    mem = ArrayBatches(x, y, 16, shuffle=False)
    tfd = list(tf_dataset(x, y, 16, shuffle=False).as_numpy_iterator())
    assert len(tfd) == len(mem)
    for i, (xb, yb) in enumerate(tfd):
        np.testing.assert_array_equal(xb, mem[i][0])
        np.testing.assert_array_equal(yb, mem[i][1])
        assert xb.dtype == np.uint8


def _assert_tf_twin_serves_the_same(mem, epochs):
    """``mem.as_tf_dataset`` yields ``mem``'s batches, epoch after epoch: one pass per epoch, each
    serving the epoch ``mem`` is at when the pass starts, and ending after the epoch's last batch."""
    ds = mem.as_tf_dataset()
    for _ in range(epochs):
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == len(mem)
        for i, (xb, yb) in enumerate(batches):
            np.testing.assert_array_equal(xb, mem[i][0])
            np.testing.assert_array_equal(yb, mem[i][1])
        mem.on_epoch_end()


@pytest.mark.parametrize("initial_epoch", [0, 1])
def test_tf_twin_of_array_batches_serves_the_same_batches_epoch_after_epoch(initial_epoch):
    pytest.importorskip("tensorflow")
    x, y = tiny_data(50)  # 50 = 3 x 16 + 2: a ragged last batch each epoch
    _assert_tf_twin_serves_the_same(ArrayBatches(x, y, 16, shuffle=True, seed=3, initial_epoch=initial_epoch), 3)
    once = list(ArrayBatches(x, y, 16, shuffle=False).as_tf_dataset().as_numpy_iterator())
    assert len(once) == 4 and np.array_equal(np.concatenate([b[1] for b in once]), y)


def test_drop_last_serves_full_batches_and_leaves_out_other_images_each_epoch():
    from keras_transfer.errors import ConfigError

    x, y = tiny_data(50)  # 3 full batches of 16, 2 images left out per epoch
    mem = ArrayBatches(x, y, 16, shuffle=True, seed=3, drop_last=True)
    left_out = []
    for _ in range(3):
        assert len(mem) == 3 and all(len(mem[i][1]) == 16 for i in range(3))
        served = np.concatenate([mem[i][0] for i in range(3)])
        assert len(np.unique(served.reshape(48, -1), axis=0)) == 48  # no image twice
        left_out.append(set(mem.order[48:].tolist()))
        mem.on_epoch_end()
    assert left_out[0] != left_out[1] != left_out[2]
    assert len(ArrayBatches(x, y, 16, shuffle=False)) == 4
    with pytest.raises(ConfigError, match="expected at least one full batch of 64 images. Received: 50"):
        ArrayBatches(x, y, 64, drop_last=True)
    if importlib.util.find_spec("tensorflow"):
        _assert_tf_twin_serves_the_same(ArrayBatches(x, y, 16, shuffle=True, seed=3, drop_last=True), 2)
        full = list(tf_dataset(x, y, 16, shuffle=True, drop_last=True).as_numpy_iterator())
        assert [len(b[1]) for b in full] == [16, 16, 16]


def test_auto_path_prefers_memory_for_small_arrays():
    x, _ = tiny_data(4)
    assert choose_input_path(x) == "memory"
    assert choose_input_path(x, "tfdata") == "tfdata"


def test_in_memory_training_never_imports_tensorflow(tmp_path):
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        pytest.skip("the TensorFlow backend imports TensorFlow by definition")
    code = (
        "import sys\n"
        "from tests.conftest import tiny_model, tiny_data\n"
        "from keras_transfer.data.pipeline import make_input\n"
        "from keras_transfer.data.augment import augmentation_layers\n"
        "import keras\n"
        "m = tiny_model(augment=augmentation_layers('strong', 1, flips=False))\n"
        "m.compile('adam', keras.losses.SparseCategoricalCrossentropy(from_logits=True))\n"
        "x, y = tiny_data(16)\n"
        "m.fit(make_input(x, y, 8, True), epochs=1, verbose=0)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        # Keras itself imports TensorFlow, when installed, to seed it and to serialise any layer config
        "from keras_transfer.accel.syncs import defer_tensorflow_import\n"
        "assert defer_tensorflow_import()\n"
        "keras.utils.set_random_seed(1)\n"
        "m.save('m.keras')\n"
        "keras.models.load_model('m.keras')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported by seeding or saving'\n"
        "print('ok')\n")
    python_prints_ok(code, backend, tmp_path)


def test_tensorflow_imported_late_gets_the_keras_seed_and_is_seen_by_keras(tmp_path):
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow" or not importlib.util.find_spec("tensorflow"):
        pytest.skip("needs TensorFlow installed beside the JAX or torch backend")
    code = (
        "import sys, keras\n"
        "from keras.src.utils import module_utils\n"
        "from keras_transfer import backend\n"
        "from keras_transfer.accel.syncs import defer_tensorflow_import\n"
        "defer_tensorflow_import()\n"
        "keras.utils.set_random_seed(7)\n"
        "assert 'tensorflow' not in sys.modules and not module_utils.tensorflow.available\n"
        "tf = backend.import_tensorflow()  # as the tf.data pipeline does\n"
        "assert module_utils.tensorflow.available  # Keras sees TensorFlow types again\n"
        "a = tf.random.uniform([4]).numpy()\n"
        "tf.random.set_seed(7)  # what keras.utils.set_random_seed(7) does with TensorFlow imported\n"
        "b = tf.random.uniform([4]).numpy()\n"
        "assert (a == b).all(), (a, b)\n"
        "print('ok')\n")
    python_prints_ok(code, backend, tmp_path)


def test_device_gather_gives_the_host_batches_and_trains():
    import keras

    if keras.config.backend() == "tensorflow":
        pytest.skip("device_gather is for JAX and torch: TensorFlow's in-memory batches run as tf.data")
    x, y = tiny_data(40)
    host = ArrayBatches(x, y, 16, shuffle=True, seed=2)
    dev = ArrayBatches(x, y, 16, shuffle=True, seed=2, on_device=True)
    assert dev.on_device and not host.on_device  # "auto" stays on the host on this CPU-only machine
    for _ in range(2):  # two epochs: the device copy follows the epoch's permutation
        for i in range(len(host)):
            (hx, hy), (dx, dy) = host[i], dev[i]
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(dx), hx)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(dy), hy)
            assert keras.ops.convert_to_numpy(dx).dtype == np.uint8
        host.on_epoch_end()
        dev.on_epoch_end()
    model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(int(y.max()) + 1)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(dev, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])


def _epoch(batches):
    """The (image, label) pairs of one epoch of ``batches``, as host arrays sorted by label."""
    import keras

    xs = np.concatenate([keras.ops.convert_to_numpy(batches[i][0]) for i in range(len(batches))])
    ys = np.concatenate([keras.ops.convert_to_numpy(batches[i][1]) for i in range(len(batches))])
    order = np.argsort(ys, kind="stable")
    return xs[order], ys[order]


@pytest.mark.parametrize("on_device", [False, True])
def test_alternating_flips_mirror_every_image_each_epoch(on_device):
    import keras

    if on_device and keras.config.backend() == "tensorflow":
        pytest.skip("device_gather is for JAX and torch: TensorFlow's in-memory batches run as tf.data")
    x, y = tiny_data(50)
    y = np.arange(50)  # one label per image, to find each image again
    b = ArrayBatches(x, y, 16, shuffle=True, seed=4, alternate_flips=True, on_device=on_device)
    seen = []
    for _ in range(3):
        xs, ys = _epoch(b)
        np.testing.assert_array_equal(ys, y)
        seen.append(xs)
        b.on_epoch_end()
    mirrored = [np.array([np.array_equal(s[i], x[i, :, ::-1]) for i in range(50)]) for s in seen]
    kept = [np.array([np.array_equal(s[i], x[i]) for i in range(50)]) for s in seen]
    assert all((m | k).all() for m, k in zip(mirrored, kept))  # each image as it is or mirrored
    assert 10 < mirrored[0].sum() < 40  # a random half in epoch 0 ...
    np.testing.assert_array_equal(mirrored[1], ~mirrored[0])  # ... the other half in epoch 1
    np.testing.assert_array_equal(mirrored[2], mirrored[0])
    resumed = ArrayBatches(x, y, 16, shuffle=True, seed=4, alternate_flips=True, initial_epoch=1)
    np.testing.assert_array_equal(_epoch(resumed)[0], seen[1])
    np.testing.assert_array_equal(x, tiny_data(50)[0])  # the source arrays are untouched


def test_tf_twin_serves_the_same_alternating_flips():
    pytest.importorskip("tensorflow")
    x, y = tiny_data(50)
    _assert_tf_twin_serves_the_same(ArrayBatches(x, y, 16, shuffle=True, seed=5, alternate_flips=True), 2)


def test_alternating_flips_need_the_in_memory_path():
    from keras_transfer.config import DataConfig
    from keras_transfer.data.pipeline import make_input
    from keras_transfer.errors import ConfigError

    x, y = tiny_data(8)
    with pytest.raises(ConfigError, match="alternate needs the in-memory input path"):
        make_input(x, y, 4, True, path="tfdata", alternate_flips=True)
    with pytest.raises(ConfigError, match="alternate needs the in-memory input path"):
        DataConfig(flips="alternate", input_path="tfdata")
    with pytest.raises(ConfigError, match="data.flips: expected true, false, alternate or null. Received: 'sometimes'"):
        DataConfig(flips="sometimes")
