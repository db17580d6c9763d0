"""How many torch operators a training step dispatches: Keras' layers, the package, timm.

On a GPU an eager torch step is a stream of kernel launches prepared by the host; each operator that is
not a view (`keras_transfer.accel.diagnostics.op_counter`) is at least one launch and its share of host work, so
the count is what an eager step costs the host besides Python. A CPU is enough to count them: the
operators do not depend on the device. The bytes each operator reads and writes (`diagnostics.op_counter`)
are the device's memory traffic for the step's memory-bound kernels (elementwise ops, casts,
normalisation); at 224x224 they grow with the batch, and the growth per image is what a large-batch
step costs the device beyond the convolutions' arithmetic. Per step means the difference between a fit
of ``2 n`` and one of ``n`` steps, over ``n`` (per-epoch work cancels out).

    KERAS_BACKEND=torch python benchmarks/torch_ops.py
    KERAS_BACKEND=torch python benchmarks/torch_ops.py --precision mixed_bfloat16 --top 12
    KERAS_BACKEND=torch python benchmarks/torch_ops.py --precision mixed_bfloat16 --size 224 --batch 16

Rows: ``keras`` is keras.applications EfficientNetB0 with Keras' own layers compiled with Adam, numpy
arrays through ``fit``, Keras' own code (`syncs.stock_keras`); ``package`` is the bench's "ours"
(`compile_model`: the fast layers, direct calls, kernels laid out for torch; batches gathered on the
device); ``timm`` is timm's ``efficientnet_b0`` (where timm imports) with
``torch.optim.Adam(foreach=True)``, as it runs on a GPU by default (on a CPU torch picks one op per
tensor instead). timm's count includes two ``_local_scalar_dense`` per parameter: Adam reads its step
counts, which torch keeps in host memory, so they launch nothing on a GPU.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

from keras_transfer.accel import diagnostics, syncs  # noqa: E402
from keras_transfer.bench import ours_and_plain, synthetic_images, timm_available  # noqa: E402
from keras_transfer.data.pipeline import ArrayBatches  # noqa: E402
from keras_transfer.optim import SparseSmoothedCrossentropy, set_precision  # noqa: E402


def per_step(run, steps):
    """Operators and MiB read + written per step of ``run(n)`` (n steps), by operator name: two dicts."""
    found = []
    for n in (steps, 2 * steps):
        with diagnostics.op_counter() as c:
            run(n)
        found.append(c)
    ops, mib = ({k: (b[k] - a[k]) / steps / scale for k in b if b[k] != a[k]}
                for a, b, scale in ((found[0].counts, found[1].counts, 1), (found[0].bytes, found[1].bytes, 2**20)))
    return ops, mib


def keras_layers_model(size):
    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(size, size, 3),
                                             pooling="avg")
    model = keras.Model(base.input, keras.layers.Dense(10)(keras.layers.Dense(256, activation="relu")(base.output)))
    model.compile(keras.optimizers.Adam(1e-3), SparseSmoothedCrossentropy(0.0))
    return model


def timm_steps(size, batch, precision):
    import timm
    import torch

    net = timm.create_model("efficientnet_b0", num_classes=10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(net.parameters(), 1e-3, foreach=True)
    x, y = synthetic_images(batch, size)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y)

    def run(n):
        for _ in range(n):
            with torch.autocast("cpu", torch.bfloat16, enabled=precision != "float32"):
                loss = torch.nn.functional.cross_entropy(net(xt.float() / 255.0), yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(1)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="float32")
    p.add_argument("--top", type=int, default=0, help="also list each row's most frequent operators")
    a = p.parse_args()
    assert keras.config.backend() == "torch", "the torch backend is needed"
    set_precision(a.precision)
    x, y = synthetic_images(2 * a.steps * a.batch, a.size)
    rows = {}

    stock = keras_layers_model(a.size)

    def fit_stock(n):
        with syncs.stock_keras():
            stock.fit(x, y, batch_size=a.batch, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False)

    fit_stock(1)
    rows["keras"] = per_step(fit_stock, a.steps)

    ours, _ = ours_and_plain("efficientnet_b0", a.size, "full", a.steps, a.precision)
    data = ArrayBatches(x, y, a.batch, on_device=True)

    def fit_ours(n):
        ours.fit(data, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False)

    fit_ours(1)
    rows["package"] = per_step(fit_ours, a.steps)
    if timm_available():
        rows["timm"] = per_step(timm_steps(a.size, a.batch, a.precision), a.steps)

    print(f"EfficientNetB0, {a.size}x{a.size}, batch {a.batch}, {a.precision}, training step, torch "
          f"operators other than views and the MiB they read and write:\n\n"
          f"| model | operators per step | MiB per step |\n|---|---:|---:|")
    for name, (ops, mib) in rows.items():
        print(f"| {name} | {sum(ops.values()):.0f} | {sum(mib.values()):,.0f} |")
    for name, (ops, mib) in rows.items() if a.top else ():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:a.top]
        print(f"\n{name}, most frequent: " + ", ".join(f"{k} {v:.0f}" for k, v in top))
        top = sorted(mib.items(), key=lambda kv: -kv[1])[:a.top]
        print(f"{name}, most MiB: " + ", ".join(f"{k} {v:,.1f}" for k, v in top))

if __name__ == "__main__":
    main()
