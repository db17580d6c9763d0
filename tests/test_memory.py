"""Peak memory of a stage: what it measures, and that a stage does not inherit an earlier stage's peak."""

import keras

from tests.conftest import python_prints_ok

# In a fresh interpreter: the tests before it in this process (and ktransfer's glibc tuning, which keeps freed
# memory resident) would set its baseline.
CODE = """
import numpy as np
from keras_transfer.memory import PeakMemory, peak_host_bytes

before = peak_host_bytes()
with PeakMemory() as big:
    a = np.ones(300 * 1024 * 1024 // 8)  # 300 MB, touched
    del a
with PeakMemory() as small:
    b = np.ones(1024)
    del b
big, small = big.as_dict(), small.as_dict()
assert big["peak_host_mb"] >= before / 2**20 + 250, (before, big)
if small["peak_host_scope"] == "stage":  # Linux lets a process reset its high-water mark
    assert small["peak_host_mb"] < big["peak_host_mb"] - 200, (small, big)
else:
    assert small["peak_host_mb"] >= big["peak_host_mb"], (small, big)
assert big["peak_device_mb"] is None  # no accelerator in these tests' CPU runs
print("ok")
"""


def test_the_peak_covers_memory_touched_inside_and_is_reset_per_stage(tmp_path):
    python_prints_ok(CODE, keras.config.backend(), str(tmp_path))
