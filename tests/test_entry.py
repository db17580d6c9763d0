"""The ktransfer entry point: a backend Keras cannot load is one line and exit 2, before Keras is imported."""

import os
import subprocess
import sys

from keras_transfer import entry


def test_an_unknown_backend_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "keras_transfer", "info"], capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "mxnet"}, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Unknown Keras backend: expected one of jax, tensorflow, torch" in lines[0]
    assert "Received: KERAS_BACKEND='mxnet'" in lines[0] and not out.stdout


def test_an_uninstalled_backend_names_the_installed_ones(monkeypatch):
    real = entry.importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda n: None if n == "torch" else real(n))
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    err = entry.backend_error()
    assert err.startswith("The torch backend is not installed: set KERAS_BACKEND to one of the installed backends")
    assert "Received: KERAS_BACKEND -> torch" in err


def test_unset_backend_reads_keras_json_then_defaults_to_tensorflow(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert entry.configured_backend() == ("tensorflow", "Keras' default (KERAS_BACKEND unset)")
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert entry.configured_backend() == ("jax", str(tmp_path / "keras.json"))
    monkeypatch.setattr(entry, "installed_backends", lambda: ["jax"])
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert "e.g. KERAS_BACKEND=jax ktransfer" in entry.backend_error()
