"""keras-transfer: transfer learning for image classification on Keras 3 (TF, JAX, PyTorch)."""

__version__ = "0.1.0"
