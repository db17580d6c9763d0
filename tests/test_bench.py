import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_transfer import bench
from keras_transfer.cli import main

JIT = keras.config.backend() != "torch"  # torch.compile costs minutes per model on CPU


def test_bench_case_measures_ours_and_plain_keras_on_the_same_model():
    r = bench.bench_case("resnet", 16, "linear", batch=8, steps=2, widths=(4, 8, 8), jit=JIT, repeats=2)
    for side in ("ours", "plain_keras"):
        # the headline is the batch over the median step time (ms), the epoch rate the median of the epochs'
        assert r[side]["img_per_s"] == pytest.approx(8 * 1000 / r[side]["step_ms"])
        assert r[side]["epoch_img_per_s"] == pytest.approx(float(np.median(r[side]["epoch_img_per_s_runs"])))
        assert r[side]["compile_s"] > 0 and len(r[side]["epoch_img_per_s_runs"]) == 2
    assert r["ratio_ours_over_plain"] == pytest.approx(r["ours"]["img_per_s"] / r["plain_keras"]["img_per_s"])
    # linear probe: only the head trains (3 -> ... -> 8 hidden -> 10 logits on 8 pooled features)
    assert r["trainable_params"] == (8 * 256 + 256) + (256 * 10 + 10)
    assert r["non_trainable_params"] > 0 and r["peak_memory_mb"] > 0


def test_bench_times_steps_per_execution_on_both_sides():
    if keras.config.backend() == "torch":
        r = CliRunner().invoke(main, ["bench", "--steps", "4", "--steps-per-execution", "2", "--no-jit"])
        assert r.exit_code == 2 and "expected 1 on the torch backend" in r.output
        return
    r = bench.bench_case("resnet", 16, "linear", batch=8, steps=4, widths=(4, 8, 8), jit=JIT, repeats=1,
                         steps_per_execution=2)
    assert r["steps_per_execution"] == 2
    for side in ("ours", "plain_keras"):
        assert r[side]["img_per_s"] == pytest.approx(8 * 1000 / r[side]["step_ms"])
    with pytest.raises(ValueError, match="expected a divisor of steps=4. Received: 3"):
        bench.bench_case("resnet", 16, "linear", batch=8, steps=4, widths=(4, 8, 8), steps_per_execution=3)


def test_epoch_timing_leaves_batch_ends_to_keras_worker_thread():
    """On an accelerator steps are timed per epoch: a batch-end hook would make Keras read each step's
    loss on the main thread, a host-device synchronisation per step that the timing would then include."""
    from keras.src.backend import IS_THREAD_SAFE
    from keras.src.callbacks.callback_list import CallbackList

    from tests.conftest import tiny_data, tiny_model

    assert not CallbackList([bench._StepTimer()])._async_train
    assert CallbackList([])._async_train == IS_THREAD_SAFE  # Keras: batch ends on a worker where it can
    model = tiny_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
    timed = bench._Timed(model, tiny_data(48), steps=4, batch=8, per_step=False)
    timed.epoch()
    timed.epoch()
    r = timed.result()
    assert r["timing"] == "per epoch" and len(timed.step_ms) == 2
    # each epoch's step time is its time over its steps; the median of two is their mean
    assert r["step_ms"] == pytest.approx(sum(1000 * 8 / e for e in r["epoch_img_per_s_runs"]) / 2)
    assert bench._Timed(model, tiny_data(48), steps=4, batch=8).per_step  # on this CPU: step by step


def test_cached_probe_row_is_one_extraction_plus_head_epochs():
    r = bench.bench_cached_linear("resnet", 16, batch=8, steps=2, repeats=2, probe_epochs=10, widths=(4, 8, 8))
    extract, head = r["extract_img_per_s"], r["head"]["epoch_img_per_s"]
    assert extract > 0 and head > 0 and len(r["extract_runs"]) == 2 and r["feature_dim"] == 8
    # 10 epochs over N images take N / extract + 10 N / head seconds
    assert r["img_per_s"] == pytest.approx(10 / (1 / extract + 10 / head))
    assert r["img_per_s"] < min(head, 10 * extract)


def test_torch_reference_rows_time_a_plain_torch_module():
    torch = pytest.importorskip("torch")

    def tiny():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 10))

    r = bench.bench_torch_module(tiny, 16, batch=4, steps=2, repeats=2)
    assert len(r["epoch_img_per_s_runs"]) == 2 and r["img_per_s"] == pytest.approx(
        float(np.median(r["epoch_img_per_s_runs"])))
    # each timed run's rate and step time describe the same run: batch 4 per step
    assert r["step_ms"] == pytest.approx(float(np.median([4 * 1000 / x for x in r["epoch_img_per_s_runs"]])))
    assert r["memory_kind"] in ("device", "host RSS")


def test_bench_command_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--size", "16", "--batch-size", "4", "--steps", "1", "--repeats", "1", "--strategies",
            "linear", "--no-timm", "--cached-probe-epochs", "3", "--compile-first", "plain", "--out", str(out)]
    args += [] if JIT else ["--no-jit"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (js,) = [f for f in os.listdir(out) if f.endswith(".json")]
    data = json.load(open(out / js))
    assert data["environment"]["backend"] == keras.config.backend() and len(data["rows"]) == 1
    assert len(data["cached_probe_rows"]) == 1 and data["cached_probe_rows"][0]["probe_epochs"] == 3
    row = data["rows"][0]
    assert row["compiled_first"] == "plain"
    md = open(out / js.replace(".json", ".md")).read()
    assert "| resnet | 16 | linear | 4 | float32 | 1 |" in md and "Cached-feature linear probe" in md
    assert f"{row['ours']['compile_s']:.1f} / {row['plain_keras']['compile_s']:.1f}* |" in md


def test_bench_refuses_an_unknown_model_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--model", "resnet,vgg99", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "vgg99" in r.output and len(r.output.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["--batch-size", "--steps", "--repeats", "--size"])
def test_bench_refuses_a_count_below_one(tmp_path, option):
    r = CliRunner().invoke(main, ["bench", option, "0", "--out", str(tmp_path)])  # was a ZeroDivisionError
    assert r.exit_code == 2 and f"Invalid value for '{option}': 0 is not in the range x>=1" in r.output
    assert os.listdir(tmp_path) == []


def test_bench_probe_compares_ordinary_and_cached_linear_probes(tmp_path, digits_npz):
    import yaml

    cfg = {"model": {"input_size": 8, "widths": [4, 8, 8], "head_hidden": 8},
           "pretrain": {"epochs": 1}, "finetune": {"epochs": 3},
           "data": {"batch_size": 32, "per_class": 5, "source": f"npz:{digits_npz}", "target": f"npz:{digits_npz}"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pre = str(tmp_path / "pre")
    r = CliRunner().invoke(main, ["pretrain", "--config", str(path), "--out", pre], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "probe"
    r = CliRunner().invoke(main, ["bench-probe", "--config", str(path), "--pretrained", pre, "--seeds", "0",
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    record = json.load(open(out / "probe.json"))
    assert record["config"]["data"]["augment"] == "none"  # as the probes ran (the recipe's preset is mild)
    assert record["config"]["transfer"]["strategies"] == ["linear"]
    rows = record["rows"]
    assert [row["cached"] for row in rows] == [False, True]
    ordinary, cached = rows
    # Same frozen features, same head initialisation and batches: the same predictions up to float noise.
    assert abs(ordinary["accuracy"] - cached["accuracy"]) <= 2 / ordinary["n_test"]
    assert "| cached features |" in open(out / "probe.md").read()
