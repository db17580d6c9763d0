"""Names that models saved by keras-transfer before 0.2 use, loaded as Keras' own layers.

Those versions built networks from subclasses of six Keras layers registered as
``keras_transfer>BatchNormalization``, ``keras_transfer>Conv2D``, ... (the torch fast path, now given to
Keras' own layers by `keras_transfer.accel`). A checkpoint or model file that names them still loads, and
each such layer comes back as the Keras layer it extended, with its weights.
"""

from __future__ import annotations

import keras

LEGACY_NAMES = ("BatchNormalization", "Conv2D", "DepthwiseConv2D", "MaxPooling2D", "ZeroPadding2D",
                "GlobalAveragePooling2D")


def _loads_as(keras_class):
    class Legacy(keras_class):
        @classmethod
        def from_config(cls, config):
            return keras_class.from_config(config)

    Legacy.__name__ = Legacy.__qualname__ = keras_class.__name__
    return keras.saving.register_keras_serializable(package="keras_transfer")(Legacy)


LEGACY = {name: _loads_as(getattr(keras.layers, name)) for name in LEGACY_NAMES}
