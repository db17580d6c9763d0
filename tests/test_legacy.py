"""keras_transfer/models/legacy.py: a model saved with the layer names of versions before 0.2
(``keras_transfer>Conv2D`` ...) loads, as Keras' own layers, with its weights."""

import keras
import numpy as np

from keras_transfer.io import load_model
from keras_transfer.models.legacy import LEGACY


def test_a_model_saved_with_the_old_names_loads_as_keras_layers(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = LEGACY["ZeroPadding2D"](1)(inputs)
    x = LEGACY["Conv2D"](4, 3, name="conv")(x)
    x = LEGACY["BatchNormalization"](name="bn")(x)
    x = LEGACY["DepthwiseConv2D"](3, padding="same")(x)
    x = LEGACY["MaxPooling2D"](2)(x)
    old = keras.Model(inputs, LEGACY["GlobalAveragePooling2D"]()(x))
    old.get_layer("bn").moving_mean.assign(np.arange(4, dtype="float32"))
    path = tmp_path / "old.keras"
    old.save(path)
    assert b"keras_transfer>Conv2D" in __import__("zipfile").ZipFile(path).read("config.json")
    new = load_model(str(path))
    kinds = [type(layer) for layer in new.layers[1:]]
    assert kinds == [keras.layers.ZeroPadding2D, keras.layers.Conv2D, keras.layers.BatchNormalization,
                     keras.layers.DepthwiseConv2D, keras.layers.MaxPooling2D, keras.layers.GlobalAveragePooling2D]
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(new.predict(x, verbose=0), old.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
