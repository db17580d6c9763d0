"""Training-throughput benchmark: this package's path against plain Keras, same model, same process.

Throughput excludes compilation: a first epoch of 2 executions (tracing/XLA or torch.compile) is timed
apart as ``compile_s``, then ``repeats`` epochs of ``steps`` steps are timed, alternating ours and plain
Keras; img/s is batch / median step time (an execution's time over its ``steps_per_execution`` steps,
or on an accelerator an epoch's time over its steps: timing steps one by one synchronises each). Inputs
are uint8 arrays of the benchmarked shape (pixel values do not change the arithmetic). With timm
importable, timm's ``efficientnet_b0`` in plain PyTorch (eager and compiled) gives reference rows.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time

import keras
import numpy as np

from keras_transfer import backend
from keras_transfer.accel import syncs
from keras_transfer.config import TrainConfig
from keras_transfer.data.augment import augmentation_layers
from keras_transfer.data.pipeline import ArrayBatches, fit_input
from keras_transfer.models import build_classifier, create_backbone
from keras_transfer.optim import SparseSmoothedCrossentropy, set_precision
from keras_transfer.train import compile_model
from keras_transfer.transfer import apply_strategy, parameter_counts


class _StepTimer(keras.callbacks.Callback):
    """Per-step seconds; Keras calls batch hooks once per execution of ``steps_per_execution`` steps.

    A callback with a batch-end hook makes Keras run every batch end on the main thread and turn the
    step's loss into a Python number there: on an accelerator, a host-device synchronisation per step
    that keeps the host from queueing the next step while the device works. Only where the step runs
    on the CPU (nothing to overlap) does `_Timed` use it.
    """

    def __init__(self, steps_per_execution=1):
        super().__init__()
        self.times, self.spe = [], steps_per_execution

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append((time.perf_counter() - self._t) / self.spe)


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


def synthetic_images(n, size):
    """``n`` random uint8 RGB images and labels of 10 classes, the same for every call."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n)


def ours_and_plain(name, size, strategy, steps, precision="float32", augment="none", widths=(64, 128, 256),
                   jit="auto", steps_per_execution=1):
    """The same classifier twice, from the same initial weights: ours compiled by ``compile_model``,
    plain Keras by ``model.compile(Adam)``. ``steps``: steps per epoch (for ours' schedule)."""
    keras.utils.set_random_seed(0)
    ours = _model(name, size, 3, strategy, augment, widths)
    compile_model(ours, TrainConfig(optimizer="adam", schedule="constant", precision=precision, jit_compile=jit,
                                    weight_decay=0.0, steps_per_execution=steps_per_execution), steps)
    keras.utils.set_random_seed(0)
    plain = _model(name, size, 3, strategy, augment, widths)
    plain.compile(keras.optimizers.Adam(1e-3), SparseSmoothedCrossentropy(0.0),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=jit,
                  steps_per_execution=steps_per_execution)
    return ours, plain


class _Timed:
    """One model and its input, compiled on an epoch of 2 executions, then timed epoch by epoch.

    ``data`` holds at least ``steps + 2 * model.steps_per_execution`` batches. ``stock``: run Keras' own
    code, without the package's torch patches (`accel.syncs.stock_keras`), as plain Keras does.
    ``per_step``: time each step (`_StepTimer`); the default, on a CPU only, since on an accelerator the
    timer's per-step synchronisation would slow the steps it times. Otherwise the step time is an
    epoch's time over its steps (the epoch ends in one synchronisation, when Keras reads its logs)."""

    def __init__(self, model, data, steps, batch, stock=False, per_step=None):
        self.model, self.steps, self.batch, self.stock = model, steps, batch, stock
        self.per_step = not backend.has_accelerator() if per_step is None else per_step
        self.spe = model.steps_per_execution
        self.arrays = isinstance(data, tuple)
        self.data = data if self.arrays else fit_input(data)[0]
        self.rates, self.step_ms = [], []
        t0 = time.perf_counter()
        self._run(2 * self.spe)  # compilation (XLA / torch.compile) and warm-up, on whole executions
        self.compile_s = time.perf_counter() - t0

    def _run(self, n, callbacks=()):
        kw = {"epochs": 1, "steps_per_epoch": n, "verbose": 0, "callbacks": list(callbacks), "shuffle": False}
        with syncs.stock_keras() if self.stock else contextlib.nullcontext():
            if self.arrays:
                return self.model.fit(*self.data, batch_size=self.batch, **kw)
            return self.model.fit(self.data, **kw)

    def epoch(self):
        timers = [_StepTimer(self.spe)] if self.per_step else []
        t1 = time.perf_counter()
        self._run(self.steps, timers)
        seconds = time.perf_counter() - t1
        self.rates.append(self.steps * self.batch / seconds)
        if timers:
            self.step_ms.extend(1000 * t for t in timers[0].times)
        else:
            self.step_ms.append(1000 * seconds / self.steps)

    def result(self):
        # The headline is batch / median step time (input wait included: the step fetches its batch):
        # per step on a CPU, where it resists the bimodal epochs of 2-core machines (whole epochs at
        # ~0.6x on both paths); per epoch on an accelerator.
        step = float(np.median(self.step_ms))
        return {"compile_s": self.compile_s, "img_per_s": 1000 * self.batch / step, "step_ms": step,
                "timing": "per step" if self.per_step else "per epoch",
                "epoch_img_per_s": float(np.median(self.rates)), "epoch_img_per_s_runs": self.rates}


def bench_case(name, size, strategy, batch, steps, precision="float32", augment="none", widths=(64, 128, 256),
               jit="auto", repeats=3, compile_first="ours", steps_per_execution=1):
    """One row: ours vs plain Keras for a model, input size, strategy and batch size.

    Ours is the package's path (`ArrayBatches`, through `fit_input`, and `compile_model`); plain
    Keras is the same model compiled with Adam and fed the numpy arrays through ``model.fit``.
    Timed epochs alternate between the two, so drift of the machine (clock, other load) hits both.
    ``jit``: ``"auto"`` (both sides take Keras' default: XLA on JAX, on TensorFlow only with an
    accelerator, eager torch) or a bool forced on both. ``compile_first``: ``"ours"`` or ``"plain"``,
    the side compiled first; a process's first compilation may pay one-off costs the second reuses
    (on GPUs, XLA's in-process convolution autotuning), so swapping it tells the two apart.
    ``steps_per_execution``: Keras' option, the same on both sides (JAX and TensorFlow); ``steps``
    must be a multiple of it, so that every timed execution is a whole one.
    """
    if compile_first not in ("ours", "plain"):
        raise ValueError(f"compile_first: expected 'ours' or 'plain'. Received: {compile_first!r}")
    if steps_per_execution < 1 or steps % steps_per_execution:
        raise ValueError(f"steps_per_execution: expected a divisor of steps={steps}. "
                         f"Received: {steps_per_execution}")
    set_precision(precision)
    x, y = synthetic_images(batch * (steps + 2 * steps_per_execution), size)
    ours, plain = ours_and_plain(name, size, strategy, steps, precision, augment, widths, jit, steps_per_execution)
    trainable, frozen = parameter_counts(ours)
    inputs = {"ours": (ours, ArrayBatches(x, y, batch, shuffle=True)), "plain": (plain, (x, y))}
    second = "plain" if compile_first == "ours" else "ours"
    built = {side: _Timed(*inputs[side], steps, batch, stock=side == "plain") for side in (compile_first, second)}
    timed = [built["ours"], built["plain"]]
    del inputs, built
    for _ in range(repeats):
        for t in timed:
            t.epoch()
    r_ours, r_plain = (t.result() for t in timed)
    r_ours["jit_compile"], r_plain["jit_compile"] = bool(ours.jit_compile), bool(plain.jit_compile)
    del ours, plain, timed
    keras.backend.clear_session()
    mem, mem_kind = _peak_memory_mb()
    return {"model": name, "size": size, "strategy": strategy, "batch": batch, "steps": steps,
            "repeats": repeats, "precision": precision, "augment": augment, "backend": keras.config.backend(),
            "steps_per_execution": steps_per_execution, "compiled_first": compile_first,
            "trainable_params": trainable, "non_trainable_params": frozen,
            "ours": r_ours, "plain_keras": r_plain,
            "ratio_ours_over_plain": r_ours["img_per_s"] / r_plain["img_per_s"],
            "peak_memory_mb": mem, "memory_kind": mem_kind}


def bench_cached_linear(name, size, batch, steps, precision="float32", repeats=3, probe_epochs=10,
                        widths=(64, 128, 256)):
    """The cached-feature linear probe's throughput, for the same model, data size and batch.

    The frozen backbone runs once over the data (``predict``, timed after a warm-up pass), then the
    head trains on the stored features (timed epochs after a compiling one). A probe of
    ``probe_epochs`` epochs over N images then takes N / extract + probe_epochs * N / head seconds;
    ``img_per_s`` is its effective rate, ``probe_epochs * N`` images over that time, to compare with
    the ordinary probe's per-epoch training rate (which pays the backbone every epoch).
    """
    from keras_transfer.transfer import feature_extractor, head_model

    set_precision(precision)
    n = batch * (steps + 2)  # as in bench_case: the head's 2-step compiling epoch and timed epochs fit in it
    x, y = synthetic_images(n, size)
    keras.utils.set_random_seed(0)
    model = _model(name, size, 3, "linear", "none", widths)
    extractor = feature_extractor(model)
    t0 = time.perf_counter()
    extractor.predict(x[:2 * batch], batch_size=batch, verbose=0)
    extract_compile_s = time.perf_counter() - t0
    extract = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        feats = np.asarray(extractor.predict(x, batch_size=batch, verbose=0))
        extract.append(n / (time.perf_counter() - t1))
    head = head_model(model)
    compile_model(head, TrainConfig(optimizer="adam", schedule="constant", precision=precision,
                                    weight_decay=0.0), steps)
    timed = _Timed(head, ArrayBatches(feats, y, batch, shuffle=True), steps, batch)
    for _ in range(repeats):
        timed.epoch()
    r_head = timed.result()
    r_extract = float(np.median(extract))
    effective = probe_epochs / (1 / r_extract + probe_epochs / r_head["epoch_img_per_s"])
    del model, extractor, head, timed
    keras.backend.clear_session()
    return {"model": name, "size": size, "strategy": "linear (cached features)", "batch": batch, "steps": steps,
            "repeats": repeats, "precision": precision, "backend": keras.config.backend(),
            "feature_dim": int(feats.shape[-1]), "extract_img_per_s": r_extract, "extract_runs": extract,
            "extract_compile_s": extract_compile_s, "head": r_head, "probe_epochs": probe_epochs,
            "img_per_s": effective}


def bench_torch_module(make_module, size, batch, steps, precision="float32", compiled=False, repeats=3):
    """Training throughput of a plain PyTorch module (the reference rows, e.g. timm's EfficientNet-B0).

    Data sit on the device already (uint8 -> float in the step), channels_last, Adam, cross-entropy;
    ``mixed_bfloat16`` runs the forward pass under ``torch.autocast(bfloat16)``.

    Args:
        make_module: callable returning a ``torch.nn.Module`` with 10 outputs.
        compiled: bool. Wrap the module in ``torch.compile``.

    Returns:
        ``{"compile_s", "img_per_s", "epoch_img_per_s_runs", "step_ms", "peak_memory_mb", "memory_kind"}``;
        img/s is the median of the timed repeats (a per-step sync would slow the GPU down).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    module = make_module().to(device).to(memory_format=torch.channels_last).train()
    step_module = torch.compile(module) if compiled else module
    opt = torch.optim.Adam(module.parameters(), 1e-3)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = precision == "mixed_bfloat16"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(step_module(x.float() / 255.0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    compile_s = time.perf_counter() - t0
    rates, step_ms = [], []
    for _ in range(repeats):
        t1 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        total = time.perf_counter() - t1
        rates.append(steps * batch / total)
        step_ms.append(1000 * total / steps)
    if device == "cuda":
        mem, kind = torch.cuda.max_memory_allocated() / 2**20, "device"
    else:
        mem, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"
    return {"compile_s": compile_s, "img_per_s": float(np.median(rates)), "epoch_img_per_s_runs": rates,
            "step_ms": float(np.median(step_ms)), "peak_memory_mb": mem, "memory_kind": kind}


def timm_available():
    try:
        import timm  # noqa: F401
    except Exception:  # absent, or its torchvision does not load against this torch
        return False
    return True


def bench_timm(size, batch, steps, precision="float32", repeats=3):
    """timm ``efficientnet_b0`` (10 classes), eager and ``torch.compile``-d: reference rows for the table."""
    import timm

    rows = []
    for compiled in (False, True):
        r = bench_torch_module(lambda: timm.create_model("efficientnet_b0", num_classes=10), size, batch, steps,
                               precision, compiled, repeats)
        rows.append({"library": "timm", "model": "efficientnet_b0", "compiled": compiled, "size": size,
                     "batch": batch, "steps": steps, "precision": precision, **r})
    return rows


def probe_config(cfg):
    """``cfg`` as `bench_cached_probe` runs it: the linear strategy alone, augmentation off (cached
    features are of un-augmented images, so the ordinary probe must see the same)."""
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment="none"),
                               transfer=dataclasses.replace(cfg.transfer, strategies=("linear",)))


def bench_cached_probe(cfg, pretrained, out_dir, seeds=(0,), echo=None):
    """Linear probe two ways on the same data and seeds: ordinary (the frozen backbone runs every
    epoch) and on cached features (it runs once), each with `probe_config(cfg)`.

    Returns:
        rows ``{"seed", "cached", "accuracy", "macro_f1", "wall_time"}``; runs under ``out_dir``.
    """
    import dataclasses
    import os

    from keras_transfer import pretrained as pretrained_lib
    from keras_transfer import runner

    cfg = pretrained_lib.with_pretrained(probe_config(cfg), pretrained)
    rows = []
    for seed in seeds:
        for cached in (False, True):
            c = dataclasses.replace(cfg, seed=seed,
                                    transfer=dataclasses.replace(cfg.transfer, cached_features=cached))
            run_dir = os.path.join(out_dir, f"seed{seed}-{'cached' if cached else 'ordinary'}")
            r = runner.finetune(c, run_dir)["linear"]
            rows.append({"seed": seed, "cached": cached, "accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"],
                         "wall_time": r["wall_time"], "epochs": r["epochs"], "n_test": r["n"]})
            if echo:
                echo(f"seed {seed} {'cached  ' if cached else 'ordinary'} accuracy {r['accuracy']:.4f} "
                     f"wall {r['wall_time']:.1f} s")
    return rows


def probe_markdown(env, cfg, pretrained, rows):
    def stats(cached, key):
        v = np.array([r[key] for r in rows if r["cached"] == cached])
        return v.mean(), (v.std(ddof=1) if len(v) > 1 else float("nan"))

    lines = [f"Measured {env['date']} on {env['backend']} ({'; '.join(env['backend_info'])}), Keras {env['keras']}, "
             f"{env['cpu_count']} CPU cores.", "",
             f"Linear probe on `{cfg.data.target}` ({cfg.data.per_class or 'all'} images per class, "
             f"{cfg.finetune.epochs} epochs, augmentation off) over the frozen backbone of `{pretrained}`; "
             f"seeds {sorted({r['seed'] for r in rows})}.", "",
             "| probe | accuracy (mean ± std) | macro-F1 | wall time s (mean) |", "|---|---:|---:|---:|"]
    for cached in (False, True):
        a, sa = stats(cached, "accuracy")
        f, _ = stats(cached, "macro_f1")
        w, _ = stats(cached, "wall_time")
        lines.append(f"| {'cached features' if cached else 'ordinary'} | {a:.4f} ± {sa:.4f} | {f:.4f} | {w:.1f} |")
    lines += ["", "| seed | probe | accuracy | wall s |", "|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {'cached' if r['cached'] else 'ordinary'} | {r['accuracy']:.4f} | "
                     f"{r['wall_time']:.1f} |")
    return "\n".join(lines) + "\n"


def environment():
    from keras_transfer.backend import backend_info

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": __import__("os").cpu_count(), "keras": keras.__version__,
            "backend": keras.config.backend(), "backend_info": backend_info()}


def _on_off(flag):
    return "on" if flag else "off"


def _first(row, side):
    return "*" if row.get("compiled_first", "ours") == side else ""


def markdown_table(env, rows, reference_rows=(), cached_rows=()):
    lines = [f"Measured {env['date']} on {env['backend']} ({'; '.join(env['backend_info'])}), Keras "
             f"{env['keras']}, {env['cpu_count']} CPU cores, {env['machine']}"
             + (f"; the training rows data-parallel on {env['devices']} devices (keras.distribution.DataParallel), "
                f"the cached-probe rows on one" if env.get("devices", 1) > 1 else "") + ".", "",
             "Throughput excludes compilation: batch / median step time, input wait included; "
             + ("steps timed one by one (whole-epoch rates in the JSON)." if all(
                 r["ours"].get("timing", "per step") == "per step" for r in rows) else
                "a step's time is its epoch's time over its steps (no per-step synchronisation on an "
                "accelerator)."), "",
             "| model | size | strategy | batch | precision | steps / execution | ours img/s | plain Keras img/s "
             "| ours/plain | step ms (ours) | compile s (ours / plain; * = compiled first) | XLA / torch.compile "
             "| peak memory MB |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['strategy']} | {r['batch']} | {r['precision']} | "
                     f"{r.get('steps_per_execution', 1)} | {r['ours']['img_per_s']:.1f} | "
                     f"{r['plain_keras']['img_per_s']:.1f} | {r['ratio_ours_over_plain']:.3f} | "
                     f"{r['ours']['step_ms']:.1f} | "
                     f"{r['ours']['compile_s']:.1f}{_first(r, 'ours')} / "
                     f"{r['plain_keras']['compile_s']:.1f}{_first(r, 'plain')} | "
                     f"{_on_off(r['ours']['jit_compile'])} / {_on_off(r['plain_keras']['jit_compile'])} | "
                     f"{r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")
    if cached_rows:
        lines += ["", "Cached-feature linear probe (`--cached-features`): the frozen backbone runs once, the head "
                  "trains on stored features. Effective img/s = a probe of E epochs over N images, E * N over "
                  "(one extraction pass + E head epochs).", "",
                  "| model | size | batch | precision | extraction img/s | head img/s | E | effective img/s |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in cached_rows:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | "
                         f"{r['extract_img_per_s']:.1f} | {r['head']['epoch_img_per_s']:.1f} | {r['probe_epochs']} | "
                         f"{r['img_per_s']:.1f} |")
    if reference_rows:
        lines += ["", "Reference: plain PyTorch (full fine-tune, Adam, data on the device, channels_last).", "",
                  "| library | model | compiled | size | batch | precision | img/s | step ms | compile s "
                  "| peak memory MB |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in reference_rows:
            lines.append(f"| {r['library']} | {r['model']} | {r['compiled']} | {r['size']} | {r['batch']} | "
                         f"{r['precision']} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
                         f"{r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")
    return "\n".join(lines) + "\n"
