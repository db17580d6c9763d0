"""Training-throughput benchmark: this package's path against plain Keras, same model, same process.

Throughput excludes compilation: the first epoch (tracing/XLA or torch.compile) is timed apart as
``compile_s``, then ``steps`` steps are timed batch by batch. Inputs are uint8 arrays of the
benchmarked shape (pixel values do not change the arithmetic).
"""

from __future__ import annotations

import platform
import resource
import time

import keras
import numpy as np

from keras_transfer.config import TrainConfig
from keras_transfer.data.augment import augmentation_layers
from keras_transfer.data.pipeline import ArrayBatches
from keras_transfer.models import build_classifier, create_backbone
from keras_transfer.train import SparseSmoothedCrossentropy, compile_model, set_precision
from keras_transfer.transfer import apply_strategy, parameter_counts


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def _peak_memory_mb():
    b = keras.config.backend()
    try:
        if b == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return stats["peak_bytes_in_use"] / 2**20, "device"
        if b == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**20, "device"
    except Exception:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def _model(name, size, channels, strategy, augment, widths):
    opts = {"widths": widths} if name == "resnet" else {}
    bb = create_backbone(name, size, channels, None, **opts)
    m = build_classifier(bb, name, (size, size, channels), 10,
                         augment=augmentation_layers(augment, channels, seed=0), head_hidden=256)
    apply_strategy(m, name, strategy)
    return m


def _timed_fit(model, data, steps, batch):
    timer = _StepTimer()
    t0 = time.perf_counter()
    # Epoch 1: compilation + warm-up (1 step more than steps_per_execution needs).
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0) if not isinstance(data, tuple) else \
        model.fit(*data, batch_size=batch, epochs=1, steps_per_epoch=2, verbose=0)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if isinstance(data, tuple):
        model.fit(*data, batch_size=batch, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    else:
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    total = time.perf_counter() - t1
    step = float(np.median(timer.times)) if timer.times else total / steps
    return {"compile_s": compile_s, "img_per_s": steps * batch / total, "step_ms": 1000 * step}


def bench_case(name, size, strategy, batch, steps, precision="float32", augment="none", widths=(64, 128, 256),
               jit=True):
    """One row: ours vs plain Keras for a model, input size, strategy and batch size."""
    set_precision(precision)
    channels = 3
    n = batch * (steps + 2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, 10, n)

    keras.utils.set_random_seed(0)
    ours = _model(name, size, channels, strategy, augment, widths)
    compile_model(ours, TrainConfig(optimizer="adam", schedule="constant", precision=precision, jit_compile=jit,
                                    weight_decay=0.0), steps)
    trainable, frozen = parameter_counts(ours)
    r_ours = _timed_fit(ours, ArrayBatches(x, y, batch, shuffle=True), steps, batch)
    del ours
    keras.backend.clear_session()

    keras.utils.set_random_seed(0)
    plain = _model(name, size, channels, strategy, augment, widths)
    plain.compile(keras.optimizers.Adam(1e-3), SparseSmoothedCrossentropy(0.0), jit_compile=jit)
    r_plain = _timed_fit(plain, (x, y), steps, batch)
    del plain
    keras.backend.clear_session()
    mem, mem_kind = _peak_memory_mb()
    return {"model": name, "size": size, "strategy": strategy, "batch": batch, "steps": steps,
            "precision": precision, "augment": augment, "backend": keras.config.backend(),
            "trainable_params": trainable, "non_trainable_params": frozen,
            "ours": r_ours, "plain_keras": r_plain,
            "ratio_ours_over_plain": r_ours["img_per_s"] / r_plain["img_per_s"],
            "peak_memory_mb": mem, "memory_kind": mem_kind}


def environment():
    from keras_transfer.backend import backend_info

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": __import__("os").cpu_count(), "keras": keras.__version__,
            "backend": keras.config.backend(), "backend_info": backend_info()}


def markdown_table(env, rows):
    lines = [f"Measured {env['date']} on {env['backend']} ({'; '.join(env['backend_info'])}), Keras "
             f"{env['keras']}, {env['cpu_count']} CPU cores, {env['machine']}.", "",
             "| model | size | strategy | batch | precision | ours img/s | plain Keras img/s | ours/plain "
             "| step ms (ours) | compile s (ours / plain) | peak memory MB |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['strategy']} | {r['batch']} | {r['precision']} | "
                     f"{r['ours']['img_per_s']:.1f} | {r['plain_keras']['img_per_s']:.1f} | "
                     f"{r['ratio_ours_over_plain']:.3f} | {r['ours']['step_ms']:.1f} | "
                     f"{r['ours']['compile_s']:.1f} / {r['plain_keras']['compile_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")
    return "\n".join(lines) + "\n"
