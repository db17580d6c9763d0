"""Do a trained model's BatchNorm statistics match its final (averaged) weights?

A model trained with the fast preset's Lookahead (or ``ema_momentum``) ends on averaged weights, but
its BatchNorm moving statistics were collected under the raw weights of the last steps; airbench94
averages the statistics with the weights. This script measures what that costs: it evaluates a
pretrain run's model (``--tta`` as the run used), re-estimates every BatchNorm's statistics on the
final weights as the plain mean over ``--batches`` training batches of ``--batch`` randomly flipped
images (the model's own augmentation active, as in training; torch's ``swa_utils.update_bn`` does the
same), and evaluates again. Nothing is written back.

    KTRANSFER_DATA_DIR=../shared/data KERAS_BACKEND=tensorflow python benchmarks/bn_reestimate.py \
        /tmp/fast-final-s1 --batches 20
"""

import argparse
import time

import keras
import numpy as np

from keras_transfer.data import load_dataset, train_val_test
from keras_transfer.evaluate import evaluate_model
from keras_transfer.io import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a pretrain run directory (model.keras)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tta", default="flip_translate")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    model = load_model(f"{a.run}/model.keras")
    ds = load_dataset(a.dataset)
    splits = train_val_test(ds, 0, None, None, 0)
    (x_tr, _), (x_te, y_te) = splits["train"], splits["test"]

    def accuracy():
        t0 = time.perf_counter()
        m, _ = evaluate_model(model, x_te, y_te, ds.class_names, batch_size=1000, tta=a.tta)
        return m["accuracy"], time.perf_counter() - t0

    before, s = accuracy()
    print(f"{a.run}: test accuracy ({a.tta}) as trained {before:.4f}  ({s:.0f} s)", flush=True)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momentum = [layer.momentum for layer in norms]
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(len(x_tr))
    for k in range(a.batches):
        for layer in norms:
            layer.momentum = k / (k + 1)  # moving = plain mean of the k + 1 batch statistics so far
        xb = x_tr[np.sort(order[k * a.batch:(k + 1) * a.batch])]
        flip = rng.random(len(xb)) < 0.5
        xb[flip] = xb[flip, :, ::-1]
        model(xb, training=True)
    for layer, m in zip(norms, momentum):
        layer.momentum = m
    after, s = accuracy()
    print(f"{a.run}: after re-estimating {len(norms)} BatchNorm layers on {a.batches} x {a.batch} images "
          f"{after:.4f}  ({s:.0f} s); change {after - before:+.4f}")


if __name__ == "__main__":
    main()
