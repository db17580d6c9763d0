"""keras-transfer: transfer learning for image classification on Keras 3 (TF, JAX, PyTorch).

The Python API (`keras_transfer.api`): `register_backbone`, `derive_blocks`, `classifier`, `apply_strategy`,
`parameter_counts`, `finetune`, `RunConfig`. They load on first use, so that importing the package (as the
``ktransfer`` command does) does not import Keras before the backend is checked.
"""

__version__ = "0.2.0"

__all__ = ["RunConfig", "apply_strategy", "classifier", "derive_blocks", "finetune", "parameter_counts",
           "register_backbone"]


def __getattr__(name):
    if name in __all__:
        from keras_transfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'keras_transfer' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
