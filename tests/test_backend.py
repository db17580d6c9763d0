import os

import keras

from tests.conftest import python_prints_ok


def test_backend_is_the_one_asked_for():
    # A missing KERAS_BACKEND would silently fall back to TensorFlow: refuse that.
    assert "KERAS_BACKEND" in os.environ, "set KERAS_BACKEND (tox does) so the backend is explicit"
    assert keras.config.backend() == os.environ["KERAS_BACKEND"]


def test_backend_info_names_the_backend():
    from keras_transfer.backend import backend_info

    lines = backend_info()
    assert lines[0].startswith(keras.config.backend())
    assert lines[1].startswith("devices:")


_COMPILE_TWICE = """
import os, sys
import keras
from keras_transfer.backend import enable_compilation_cache
from tests.conftest import tiny_data, tiny_model

folder = enable_compilation_cache(sys.argv[1])
m = tiny_model()
m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
x, y = tiny_data(16)
m.fit(x, y, batch_size=8, epochs=1, verbose=0)
print(sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs))
"""


def test_compilation_cache_is_written_once_and_reused_by_the_next_process(tmp_path):
    import subprocess
    import sys

    import pytest

    if keras.config.backend() == "torch":
        pytest.skip("torch.compile is off by default on CPU (minutes per model); Inductor's cache is its own")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # An earlier in-process `ktransfer` command may have pointed TF_XLA_FLAGS at its own cache folder.
    env = {**{k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", "KTRANSFER_COMPILE_CACHE")},
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run():
        out = subprocess.run([sys.executable, "-c", _COMPILE_TWICE, str(tmp_path)], capture_output=True,
                             text=True, env=env, cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    import ast

    first = ast.literal_eval(run())
    second = ast.literal_eval(run())
    if keras.config.backend() == "jax":
        # Small programs (initialisers) are cached only when their compilation took long enough,
        # which depends on the machine's load; the training step must be read back, not compiled again.
        steps = [f for f in first if f.startswith("jit_train_step")]
        assert len(steps) == 1, f"expected the train step in the cache. Received: {first}"
        assert [f for f in second if f.startswith("jit_train_step")] == steps
    else:
        assert first, "the first process wrote no compiled program"
        assert second == first, "the second process compiled again instead of reading the cache"


def test_compilation_cache_can_be_turned_off(monkeypatch):
    from keras_transfer.backend import enable_compilation_cache

    monkeypatch.setenv("KTRANSFER_COMPILE_CACHE", "off")
    assert enable_compilation_cache() is None


def test_tensorflow_retracing_warning_is_dropped_and_other_warnings_kept(tmp_path):
    """Keras' TensorFlow trainer traces a predict function per model and input size; after five such
    traces TensorFlow warned of retracing "in a loop", with a paragraph of advice (twice in the main job,
    for every strategy of an EfficientNet run). `quiet_tensorflow_retracing` drops that message only.
    TensorFlow warns at most twice per function, so the real warning is provoked in fresh interpreters."""
    import logging

    from keras_transfer.backend import _RetracingFilter, quiet_tensorflow_retracing

    logger = logging.getLogger("tensorflow")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        quiet_tensorflow_retracing()
        quiet_tensorflow_retracing()
        assert sum(isinstance(f, _RetracingFilter) for f in logger.filters) == 1
        logger.warning("6 out of the last 9 calls to <function f> triggered tf.function retracing. Tracing is ...")
        logger.warning("another warning")
        assert seen == ["another warning"]
    finally:
        logger.removeHandler(handler)
    if keras.config.backend() != "tensorflow":
        return
    code = ("import logging\n"
            "from keras_transfer.backend import quiet_tensorflow_retracing\n"
            "from tests.conftest import tiny_data, tiny_model\n"
            "seen = []\n"
            "handler = logging.Handler()\n"
            "handler.emit = lambda record: seen.append(record.getMessage())\n"
            "logging.getLogger('tensorflow').addHandler(handler)\n"
            "{quiet}\n"
            "x, _ = tiny_data(8)\n"
            "for n in range(1, 9):\n"
            "    tiny_model().predict(x[:n], verbose=0)\n"
            "warned = any('triggered tf.function retracing' in m for m in seen)\n"
            "assert warned == {expected}, seen\n"
            "print('ok')\n")
    python_prints_ok(code.format(quiet="", expected=True), "tensorflow", tmp_path)
    python_prints_ok(code.format(quiet="quiet_tensorflow_retracing()", expected=False), "tensorflow", tmp_path)
