"""Input pipelines: in-memory uint8 batches (no TensorFlow) and tf.data.

Both feed the same uint8 NHWC batches to the same model; preprocessing and
augmentation are layers inside the model. TensorFlow is imported only for the
tf.data pipelines (`tf_dataset`, `ArrayBatches.as_tf_dataset`), through
`backend.import_tensorflow`.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.errors import ConfigError

IN_MEMORY_LIMIT_BYTES = 2 << 30


def steps_per_epoch(n, batch_size, drop_last=False, multiple_of=1):
    """Batches in one epoch of ``n`` examples: a ragged last one counts, unless ``drop_last`` or it has fewer
    than ``multiple_of`` images (see `ragged_size`)."""
    return n // batch_size + (0 if drop_last else int(ragged_size(n, batch_size, multiple_of) > 0))


def ragged_size(n, batch_size, multiple_of=1):
    """The last batch's size when ``n`` examples are served in batches of ``batch_size``, cut to a multiple of
    ``multiple_of`` (the devices that share each batch, `keras_transfer.distribute`); 0 when there is none."""
    r = n % batch_size
    return r - r % multiple_of


class ArrayBatches(keras.utils.PyDataset):
    """Shuffled uint8 batches from in-memory arrays, seeded per epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a run resumed
    at epoch ``k`` sees exactly the batches an uninterrupted run would.

    Args:
        x: uint8 array (N, H, W, C).
        y: int array (N,).
        batch_size: int.
        shuffle: bool.
        seed: int.
        initial_epoch: int. Epoch index of the first epoch served.
        on_device: ``"auto"``, True or False. Keep a copy of the arrays on the accelerator and
            gather each batch there (`backend.device_gather`): ``"auto"`` does so on JAX and torch
            when a GPU/TPU computes and ``x`` is at most `IN_MEMORY_LIMIT_BYTES`. The batches are
            the same either way; only where they are gathered changes.
        alternate_flips: bool. airbench94's alternating horizontal flips (Jordan, 2024):
            each image gets one random orientation from ``seed``, used in even epochs and mirrored
            in odd ones, so every image is seen both ways in any two consecutive epochs (random
            flips repeat an orientation half the time). Use it instead of a ``RandomFlip`` layer.
        drop_last: bool. Serve only full batches: the last ``len(x) % batch_size`` images of each
            epoch's order are left out (others each epoch when shuffled).
        multiple_of: int. Cut the ragged last batch to a multiple of this (the devices that share each
            batch); the images cut are left out as with ``drop_last``.
    """

    def __init__(self, x, y, batch_size, shuffle=True, seed=0, initial_epoch=0, on_device="auto",
                 alternate_flips=False, drop_last=False, multiple_of=1):
        super().__init__(workers=1, use_multiprocessing=False)
        if drop_last and len(x) < batch_size:
            raise ConfigError(f"data.drop_last: expected at least one full batch of {batch_size} images. "
                              f"Received: {len(x)} training images")
        self.x, self.y = x, np.asarray(y, dtype=np.int32)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, bool(drop_last)
        self.multiple_of = int(multiple_of)
        if len(x) < self.multiple_of:
            raise ConfigError(f"expected at least {self.multiple_of} images, one per device that shares each batch. "
                              f"Received: {len(x)}")
        # Per-image orientation of even epochs; its own stream, so the permutations do not change.
        self.flip_bits = (np.random.default_rng([seed, 0x0F11B]).random(len(x)) < 0.5
                          if alternate_flips else None)
        if on_device == "auto":
            on_device = (keras.config.backend() in ("jax", "torch") and x.nbytes <= IN_MEMORY_LIMIT_BYTES
                         and backend.has_accelerator())
        self.on_device = bool(on_device)
        self._take = None  # device copies are made at the first batch, not for a TF-bound dataset
        self.set_epoch(initial_epoch)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order = self.epoch_order(epoch)

    def epoch_order(self, epoch):
        n = len(self.x)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self):
        return steps_per_epoch(len(self.x), self.batch_size, self.drop_last, self.multiple_of)

    def _end(self, i):
        """Where batch ``i`` ends in the epoch's order."""
        end = (i + 1) * self.batch_size
        return end if end <= len(self.x) else i * self.batch_size + ragged_size(len(self.x), self.batch_size,
                                                                                  self.multiple_of)

    def __getitem__(self, i):
        idx = np.sort(self.order[i * self.batch_size:self._end(i)]) if self.shuffle \
            else self.order[i * self.batch_size:self._end(i)]
        if self.on_device:
            if self._take is None:
                self._take = backend.device_gather(self.x, self.y)
            xb, yb = self._take(idx)
        else:
            xb, yb = self.x[idx], self.y[idx]
        if self.flip_bits is None:
            return xb, yb
        flip = self.flip_bits[idx] != bool(self.epoch % 2)
        if self.on_device:
            flip = backend.host_to_device(flip[:, None, None, None])
            return keras.ops.where(flip, keras.ops.flip(xb, axis=2), xb), yb
        xb[flip] = xb[flip, :, ::-1]
        return xb, yb

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    def as_tf_dataset(self):
        """The same batches, in the same order, as a tf.data pipeline (for the TensorFlow backend).

        Keras turns a `PyDataset` into a Python generator on TensorFlow, which costs more than a
        cheap training step (a linear probe). Here Python runs once per epoch, to draw the epoch's
        permutation; slicing, batching and prefetching run in tf.data, as for plain Keras arrays.

        The dataset is one epoch long. Each pass over it (Keras starts one per epoch) serves the
        epoch that ``self.epoch`` holds when the pass starts; in ``fit``, `FollowEpochs` sets it at
        the beginning of each epoch. Ending each epoch where it ends lets ``steps_per_execution``
        work: on an endless stream Keras' TensorFlow trainer runs whole executions, so an epoch of
        5 steps at 4 steps per execution took 8 and ate into the next epoch.
        """
        tf = backend.import_tensorflow()

        def current_epoch(_):
            epoch = tf.numpy_function(lambda: np.int64(self.epoch), [], tf.int64, stateful=True)
            return tf.ensure_shape(epoch, [])  # a known scalar, so the flipped batches keep their shape

        def batches_of(epoch):
            order = tf.numpy_function(self.epoch_order, [epoch], tf.int64, stateful=False)
            order = tf.ensure_shape(order, [len(self.x)])[:self._end(len(self) - 1)]  # full batches, or cut
            batches = tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size)
            return batches.map(lambda i: (tf.sort(i) if self.shuffle else i, epoch % 2 == 1))

        bits = np.zeros(len(self.x), bool) if self.flip_bits is None else self.flip_bits

        def gather(batch, arrays):
            (i, odd_epoch), (x, y, flip_bits) = batch, arrays
            xb = tf.gather(x, i)
            if self.flip_bits is not None:
                flip = tf.not_equal(tf.gather(flip_bits, i), odd_epoch)
                xb = tf.where(flip[:, None, None, None], tf.reverse(xb, [2]), xb)
            return xb, tf.gather(y, i)

        indices = tf.data.Dataset.range(1).map(current_epoch).flat_map(batches_of)
        arrays = tf.data.Dataset.from_tensors((self.x, self.y, bits)).repeat()
        ds = tf.data.Dataset.zip((indices, arrays)).map(gather, num_parallel_calls=tf.data.AUTOTUNE,
                                                         deterministic=True)
        # A known length: Keras then stops after the last batch instead of running out.
        return ds.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(tf.data.AUTOTUNE)


class FollowEpochs(keras.callbacks.Callback):
    """Sets an `ArrayBatches`' epoch at the beginning of each epoch of ``fit`` (for its tf.data twin,
    which Keras does not tell about epochs as it tells a `PyDataset`)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.batches.epoch:
            self.batches.set_epoch(epoch)


def fit_input(data):
    """``(data, callbacks)`` to hand to ``fit`` for an input from `make_input`.

    On TensorFlow an `ArrayBatches` becomes its tf.data twin (same batches), with a `FollowEpochs`
    callback; elsewhere it is used as it is (Keras feeds a `PyDataset` to JAX and torch without
    TensorFlow, and calls its ``on_epoch_end``).
    """
    if isinstance(data, ArrayBatches) and keras.config.backend() == "tensorflow":
        return data.as_tf_dataset(), [FollowEpochs(data)]
    return data, []


def tf_dataset(x, y, batch_size, shuffle=True, seed=0, cache=True, drop_last=False, multiple_of=1):
    """A tf.data pipeline over arrays: cache, shuffle, batch (the ragged last batch cut to a multiple of
    ``multiple_of``), prefetch(AUTOTUNE)."""
    tf = backend.import_tensorflow()

    ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y, dtype=np.int32)))
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(min(len(x), 50_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_last)
    if multiple_of > 1 and not drop_last and len(x) % batch_size:
        def cut(xb, yb):
            keep = tf.shape(xb)[0] - tf.shape(xb)[0] % multiple_of
            return xb[:keep], yb[:keep]

        ds = ds.map(cut).filter(lambda xb, yb: tf.shape(xb)[0] > 0)
    return ds.prefetch(tf.data.AUTOTUNE)


def choose_input_path(x, requested="auto"):
    """``memory`` when arrays fit comfortably (or TF is absent), else ``tfdata``."""
    if requested in ("memory", "tfdata"):
        return requested
    if x.nbytes <= IN_MEMORY_LIMIT_BYTES:
        return "memory"
    try:
        backend.import_tensorflow()
    except ImportError:
        return "memory"
    return "tfdata"


def make_input(x, y, batch_size, shuffle, seed=0, path="auto", initial_epoch=0, alternate_flips=False,
               drop_last=False, multiple_of=1):
    """The object to pass to ``fit``/``evaluate`` for arrays ``(x, y)`` on the chosen path.

    ``alternate_flips`` (see `ArrayBatches`) needs the in-memory path. ``drop_last``: only full batches.
    ``multiple_of``: the ragged last batch cut to a multiple of this (`keras_transfer.distribute`).
    """
    if choose_input_path(x, path) == "tfdata":
        if alternate_flips:
            raise ConfigError(f"data.flips: alternate needs the in-memory input path (data.input_path: memory or "
                              f"auto with at most {IN_MEMORY_LIMIT_BYTES >> 30} GiB of images). Received: "
                              f"input_path {path!r} for {x.nbytes / 2**30:.1f} GiB")
        return tf_dataset(x, y, batch_size, shuffle=shuffle, seed=seed + initial_epoch, drop_last=drop_last,
                          multiple_of=multiple_of)
    return ArrayBatches(x, y, batch_size, shuffle=shuffle, seed=seed, initial_epoch=initial_epoch,
                        alternate_flips=alternate_flips, drop_last=drop_last, multiple_of=multiple_of)
