"""Is a gap between ours and plain Keras the input path, the compile settings, or the machine?

Times one model four ways in one process, epochs alternating: ours (`compile_model`) and plain
(`model.compile(Adam)`), each fed `ArrayBatches` (the package's input) and numpy arrays (plain
Keras' input). Same harness as `ktransfer bench` (batch / median step time).

    KERAS_BACKEND=torch python benchmarks/input_paths.py --model efficientnet_b0 --strategy linear
"""

import argparse

import keras

from keras_transfer.bench import _Timed, ours_and_plain, synthetic_images
from keras_transfer.data.pipeline import ArrayBatches


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--strategy", default="linear")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    a = p.parse_args()
    x, y = synthetic_images(a.batch * (a.steps + 2), a.size)
    ours, plain = ours_and_plain(a.model, a.size, a.strategy, a.steps)
    timed = {"ours+batches": _Timed(ours, ArrayBatches(x, y, a.batch, shuffle=True), a.steps, a.batch),
             "ours+arrays": _Timed(ours, (x, y), a.steps, a.batch),
             "plain+arrays": _Timed(plain, (x, y), a.steps, a.batch),
             "plain+batches": _Timed(plain, ArrayBatches(x, y, a.batch, shuffle=True), a.steps, a.batch)}
    for _ in range(a.repeats):
        for t in timed.values():
            t.epoch()
    print(f"{keras.config.backend()} {a.model} {a.size} {a.strategy} batch {a.batch}, "
          f"{a.steps * a.repeats} timed steps per variant")
    for k, t in timed.items():
        r = t.result()
        print(f"{k:14s} {r['img_per_s']:7.1f} img/s  step {r['step_ms']:7.1f} ms  "
              f"epochs {[round(v, 1) for v in r['epoch_img_per_s_runs']]}")


if __name__ == "__main__":
    main()
