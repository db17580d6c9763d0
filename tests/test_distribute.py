"""keras_transfer.distribute: --devices, batches every device count divides, and data-parallel training that
equals one device's (JAX, two CPU devices made by XLA_FLAGS in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_transfer import distribute
from keras_transfer.cli import main
from keras_transfer.data.pipeline import ArrayBatches, make_input, ragged_size, steps_per_epoch
from keras_transfer.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value, expected", [("1", 1), (2, 2), ("all", "all"), (" ALL ", "all")])
def test_devices_parse(value, expected):
    assert distribute.parse_devices(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", True])
def test_bad_devices_are_refused(value):
    with pytest.raises(ConfigError, match="--devices: expected a number of devices >= 1 or 'all'"):
        distribute.parse_devices(value)


def test_more_devices_than_there_are_or_another_backend_is_one_line_exit_2(tmp_path, digits_npz):
    r = CliRunner().invoke(main, ["finetune", "--target", f"npz:{digits_npz}", "--source", f"npz:{digits_npz}",
                                  "--devices", "64", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    if keras.config.backend() == "jax":
        assert "expected at most the 1 local device(s) JAX sees" in r.output and "Received: 64" in r.output
    else:
        assert "Keras implements for the JAX backend" in r.output and keras.config.backend() in r.output
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("n, batch, drop_last", [(25, 8, False), (25, 8, True), (24, 8, False), (3, 8, False)])
@pytest.mark.parametrize("multiple_of", [1, 2, 4])
def test_every_batch_is_a_multiple_of_the_devices_and_the_steps_agree(n, batch, drop_last, multiple_of):
    x, y = np.zeros((n, 2, 2, 1), np.uint8), np.arange(n)
    if n < multiple_of:
        with pytest.raises(ConfigError, match=f"expected at least {multiple_of} images, one per device"):
            ArrayBatches(x, y, batch, on_device=False, multiple_of=multiple_of)
        return
    batches = ArrayBatches(x, y, batch, shuffle=True, seed=0, on_device=False, drop_last=False if n < batch
                           else drop_last, multiple_of=multiple_of)
    sizes = [len(batches[i][1]) for i in range(len(batches))]
    assert len(sizes) == steps_per_epoch(n, batch, batches.drop_last, multiple_of)
    assert all(s > 0 and s % multiple_of == 0 for s in sizes), sizes
    served = sum(sizes)
    expected = n // batch * batch + (0 if batches.drop_last else ragged_size(n, batch, multiple_of))
    assert served == expected and n - served < (batch if batches.drop_last else multiple_of)
    assert len(set(np.concatenate([batches[i][1] for i in range(len(batches))]))) == served  # no image twice


def test_the_tf_data_twins_cut_the_same_batches():
    pytest.importorskip("tensorflow")
    x = np.arange(25, dtype=np.uint8).reshape(25, 1, 1, 1)
    y = np.arange(25)
    batches = ArrayBatches(x, y, 8, shuffle=True, seed=3, on_device=False, multiple_of=2)
    twin = [b[1].numpy() for b in batches.as_tf_dataset()]
    assert [list(t) for t in twin] == [list(batches[i][1]) for i in range(len(batches))]
    tfd = make_input(x, y, 8, False, path="tfdata", multiple_of=4)
    assert [len(b[1]) for b in tfd] == [8, 8, 8]  # the last image (25 % 8 = 1 < 4) is left out


def test_predict_without_a_distribution_is_keras_predict():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).random((7, 3)).astype("float32")
    assert distribute.device_count() == 1
    np.testing.assert_allclose(distribute.predict(model, x, 4), model.predict(x, batch_size=4, verbose=0))


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import keras, numpy as np
    from click.testing import CliRunner
    from keras_transfer import distribute
    from keras_transfer.config import TrainConfig
    from keras_transfer.data.pipeline import make_input, steps_per_epoch
    from keras_transfer.train import compile_model, fit, resume_state
    from keras_transfer.transfer import apply_strategy
    from tests.conftest import tiny_data, tiny_model

    out = sys.argv[1]
    assert len(keras.distribution.list_devices()) == 2, keras.distribution.list_devices()
    CFG = TrainConfig(epochs=2, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", warmup_epochs=0)
    x, y = tiny_data(20)  # 20 = 2 batches of 8 and a ragged one of 4
    xv, yv = tiny_data(15, seed=1)  # odd: one image is left out of validation on 2 devices

    def data(n, start=0):
        return (make_input(x, y, 8, True, 0, initial_epoch=start, multiple_of=n),
                make_input(xv, yv, 8, False, multiple_of=n))

    def train(n, strategy, stage_dir, epochs, resume_from=None):
        with distribute.data_parallel(n):
            assert distribute.device_count() == n
            if resume_from:
                model, start = resume_state(resume_from)
            else:
                keras.utils.set_random_seed(0)
                model = tiny_model()
                apply_strategy(model, "resnet", strategy, train_last_k=1)
                compile_model(model, CFG, steps_per_epoch(len(x), 8, multiple_of=n))
                start = 0
            fit(model, *data(n, start), CFG, resume_from or stage_dir, initial_epoch=start, epochs=epochs)
            logits = distribute.predict(model, x[:13], 8)  # 13: the last batch padded on 2 devices
            return [np.asarray(w) for w in model.get_weights()], np.asarray(logits)

    result = {}
    for strategy in ("full", "partial"):  # BatchNorm trained, and frozen in inference mode
        w1, p1 = train(1, strategy, f"{out}/{strategy}-1", 2)
        w2, p2 = train(2, strategy, f"{out}/{strategy}-2", 2)
        result[strategy] = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
        result[strategy + "_predict"] = float(np.abs(p1 - p2).max())
        result[strategy + "_rows"] = len(p2)
        # Interrupted after epoch 1 on one device count, resumed on the other (frozen BatchNorm: the case with
        # most state; one device's resume is tested in test_train).
        for a, b in ((1, 2), (2, 1)) if strategy == "partial" else ():
            train(a, strategy, f"{out}/{strategy}-{a}to{b}", 1)
            wr, _ = train(b, strategy, None, 2, resume_from=f"{out}/{strategy}-{a}to{b}")
            result[f"{strategy}_resume_{a}to{b}"] = max(float(np.abs(u - v).max()) for u, v in zip(w1, wr))

    from keras_transfer.cli import main
    r = CliRunner().invoke(main, ["finetune", "--source", f"npz:{sys.argv[2]}", "--target", f"npz:{sys.argv[2]}",
                                  "--input-size", "8", "--width", "4,8,8", "--head-hidden", "8",
                                  "--pretrain-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
                                  "--per-class", "3", "--strategies", "linear,partial", "--devices", "all",
                                  "--out", f"{out}/run", "--no-preview"])
    assert r.exit_code == 0, r.output
    result["cli"] = json.load(open(f"{out}/run/strategies/partial/metrics.json"))
    result["cli_pretrain"] = json.load(open(f"{out}/run/pretrain/metrics.json"))
    print("RESULT " + json.dumps({k: v if not isinstance(v, dict) else {"devices": v["devices"], "n": v["n"]}
                                  for k, v in result.items()}))
""")


@pytest.mark.skipif(keras.config.backend() != "jax", reason="keras.distribution's data parallelism runs on JAX")
def test_two_devices_train_the_same_weights_as_one_and_resume_across_device_counts(tmp_path, digits_npz):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_BACKEND": "jax",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with np.load(digits_npz) as d:  # 397 images, so the test split is odd and its last batch is padded
        x, y = d["x"][:397], d["y"][:397]
    odd = str(tmp_path / "odd.npz")
    np.savez(odd, x=x, y=y)
    from keras_transfer.data.splits import stratified_split

    n_test = len(stratified_split(y, 0.2, seed=0)[1])
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), odd], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    print("1 device against 2:", r)
    # The same global batches on 1 and 2 devices: the same weights to float32 round-off (XLA reduces the
    # batch's sums in another order on 2 devices), BatchNorm trained and frozen alike.
    for strategy in ("full", "partial"):
        assert r[strategy] < 1e-5, r
        assert r[strategy + "_predict"] < 1e-5 and r[strategy + "_rows"] == 13, r
    assert r["partial_resume_1to2"] < 1e-5 and r["partial_resume_2to1"] < 1e-5, r
    # The command line: every stage records its device count, and test metrics cover every test image.
    assert r["cli"]["devices"] == r["cli_pretrain"]["devices"] == 2, r
    assert n_test % 2 == 1 and r["cli"]["n"] == r["cli_pretrain"]["n"] == n_test, (n_test, r)
