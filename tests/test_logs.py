"""keras_transfer.logs: TensorFlow's C++ log lines off the terminal unless asked for; every other line kept."""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest

from keras_transfer.logs import NATIVE_LOG_LINE, native_logs_quieted

ONEDNN = ("I0000 00:00:1796660397.021799   31169 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results\n")


def test_native_log_lines_are_held_back_and_the_others_written(capfd, monkeypatch):
    monkeypatch.delenv("KTRANSFER_VERBOSE", raising=False)
    with native_logs_quieted():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, ONEDNN.encode())
        os.write(2, b"W0000 00:00:1758131437.322781 3722519 computation_placer.cc:177] computation placer\n")
        os.write(2, b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow\n")
        os.write(2, b"Error: a line of our own\n")
        os.write(2, b"F0000 00:00:1758131437.297298 3722519 cpu.cc:1] fatal: kept\n")
        print("to stdout", flush=True)
        os.write(2, b"no newline at the end")
    out, err = capfd.readouterr()
    assert err == ("Error: a line of our own\nF0000 00:00:1758131437.297298 3722519 cpu.cc:1] fatal: kept\n"
                   "no newline at the end") and out == "to stdout\n"
    monkeypatch.setenv("KTRANSFER_VERBOSE", "1")
    with native_logs_quieted():
        os.write(2, ONEDNN.encode())
    assert capfd.readouterr().err == ONEDNN


def test_the_pattern_takes_absl_info_and_warning_lines_only():
    assert NATIVE_LOG_LINE.match(ONEDNN.encode())
    assert not NATIVE_LOG_LINE.match(b"E0000 00:00:1758131437.297298 3722519 cuda_dnn.cc:8579] Unable to register")
    assert not NATIVE_LOG_LINE.match(b"Error: data.batch_size: expected an integer >= 1. Received: 0")
    assert not NATIVE_LOG_LINE.match(b"I0000 is not a log line")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None or keras.config.backend() != "tensorflow",
                    reason="runs ktransfer on TensorFlow in a subprocess: once, in the TensorFlow test run")
def test_ktransfer_on_tensorflow_prints_no_tensorflow_notices_unless_verbose(tmp_path):
    def run(*args):
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KTRANSFER_VERBOSE")}
        env["KERAS_BACKEND"] = "tensorflow"
        return subprocess.run([sys.executable, "-c", "from keras_transfer.entry import main; main()", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    quiet = run("finetune", "--lr", "-1")
    assert quiet.returncode == 2
    assert quiet.stderr == "Error: finetune.learning_rate: expected a learning rate > 0. Received: -1.0\n", quiet.stderr
    loud = run("--verbose", "finetune", "--lr", "-1")
    assert loud.returncode == 2 and loud.stderr.endswith(quiet.stderr)
