"""Where a Keras-on-torch EfficientNetB0 training step spends its time, against timm's (torch profiler).

Needs timm (and a torchvision that loads beside the installed torch).

    KERAS_BACKEND=torch python benchmarks/torch_profile.py --batch 16 --variant fast

``--variant`` is the Keras model of `torch_fast_layers.py`: ``keras`` (Keras' own layers), ``bn``
(fused BatchNormalization only) or ``fast`` (what the package builds).
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch_fast_layers import VARIANTS, build  # noqa: E402  (beside this script)


def summary(name, prof, steps, rows):
    ka = prof.key_averages()
    print(f"{name}: self CPU {sum(e.self_cpu_time_total for e in ka) / 1e3 / steps:.0f} ms per step, "
          f"{sum(e.count for e in ka) // steps} op calls per step")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--variant", default="fast", choices=VARIANTS)
    a = p.parse_args()
    import timm

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.batch * a.steps, a.size, a.size, 3)).astype("float32")
    y = rng.integers(0, 10, a.batch * a.steps)

    model = build(a.variant, a.size)
    model.fit(x[:a.batch], y[:a.batch], batch_size=a.batch, epochs=1, verbose=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.fit(x, y, batch_size=a.batch, epochs=1, verbose=0, shuffle=False)
    summary(f"Keras (torch backend, {a.variant} layers)", prof, a.steps, a.rows)

    net = timm.create_model("efficientnet_b0", num_classes=10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y)

    def step(i):
        s = slice(i * a.batch, (i + 1) * a.batch)
        loss = torch.nn.functional.cross_entropy(net(xt[s] / 255.0), yt[s])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(a.steps):
            step(i)
    summary("timm", prof, a.steps, a.rows)


if __name__ == "__main__":
    main()
