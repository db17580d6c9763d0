"""How often a Keras training step on torch makes the host wait for the GPU: plain Keras against the package.

Counts, per training step on the main thread, the two torch calls that synchronise host and device
(`keras_transfer.accel.diagnostics.SyncCounter`): tensors made from host data directly on the device (Keras'
``convert_to_tensor`` of a Python number, a seed increment, a batch of numpy arrays) and device values
read back by Python (a random op's seed). A CPU is enough to count them, nothing waits there. Per step
means the difference between a fit of ``2 n`` and one of ``n`` steps, over ``n``: what each epoch does
once (iterator set-up, reading the epoch's logs) cancels out.

    KERAS_BACKEND=torch python benchmarks/torch_syncs.py
    KERAS_BACKEND=torch python benchmarks/torch_syncs.py --cases efficientnet_b0:224:none:8 --precision mixed_bfloat16

Plain Keras: the same model, ``compile(Adam)``, numpy arrays through ``fit``, Keras' own code
(`syncs.stock_keras`). The package: `compile_model`, `ArrayBatches` gathering batches on the device.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from keras_transfer.accel import diagnostics, syncs  # noqa: E402
from keras_transfer.bench import ours_and_plain, synthetic_images  # noqa: E402
from keras_transfer.data.pipeline import ArrayBatches  # noqa: E402
from keras_transfer.optim import set_precision  # noqa: E402

CASES = ("resnet:32:strong:8", "resnet:32:translate:8", "efficientnet_b0:32:mild:8", "efficientnet_b0:32:none:8",
         "airbench:32:translate:8")


def per_step(fit, steps, counter):
    """``(copies, reads)`` per step of ``fit(n)``, a fit of ``n`` steps."""
    counts = []
    for n in (steps, 2 * steps):
        counter.reset()
        with counter.counting():
            fit(n)
        counts.append((len(counter.copies), len(counter.reads)))
    return [(b - a) / steps for a, b in zip(*counts)]


def count_case(name, size, augment, batch, steps, precision):
    """``((copies, reads) of plain Keras, (copies, reads) of the package)`` per training step."""
    x, y = synthetic_images(2 * steps * batch, size)
    ours, plain = ours_and_plain(name, size, "full", steps, precision, augment)
    data = ArrayBatches(x, y, batch, on_device=True)

    def fit_plain(n):
        with syncs.stock_keras():
            plain.fit(x, y, batch_size=batch, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False)

    def fit_ours(n):
        ours.fit(data, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False)

    with diagnostics.SyncCounter() as counter:
        fit_plain(1)  # first epochs build the optimizers and read each seed generator's state once
        fit_ours(1)
        return per_step(fit_plain, steps, counter), per_step(fit_ours, steps, counter)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated model:size:augment:batch")
    p.add_argument("--precision", default="float32")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    assert syncs.avoid_device_syncs(), "the torch backend is needed"
    set_precision(a.precision)
    print("| model | size | augmentation | batch | precision | plain Keras: copies / reads per step "
          "| package: copies / reads per step |\n|---|---:|---|---:|---|---:|---:|")
    for case in a.cases.split(","):
        name, size, augment, batch = case.split(":")
        k, o = count_case(name, int(size), augment, int(batch), a.steps, a.precision)
        print(f"| {name} | {size} | {augment} | {batch} | {a.precision} | {k[0]:.0f} / {k[1]:.0f} | "
              f"{o[0]:.0f} / {o[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
