import keras
import numpy as np

from keras_transfer.gradcam import grad_cam, last_spatial_layer


def quadrant_model():
    """A classifier whose logit depends only on the top-left quadrant of the image.

    Feature channel 0 sees only the top-left quadrant and feeds the class-0 logit;
    channel 1 sees the rest of the image and feeds no logit.
    """
    inputs = keras.Input((16, 16, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="pre_scale")(inputs)
    b_in = keras.Input((16, 16, 1), name="backbone_input")
    f = keras.layers.Conv2D(2, 1, use_bias=False, kernel_initializer="ones", name="feat")(b_in)
    mask = np.zeros((1, 16, 16, 2), "float32")
    mask[:, :8, :8, 0] = 1.0
    mask[..., 1] = 1.0 - mask[..., 0]
    f = keras.layers.Activation("linear", name="feat_out")(f * mask)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(f)
    backbone = keras.Model(b_in, pooled, name="backbone")
    y = backbone(x)
    kernel = keras.initializers.Constant([[1.0, -1.0], [0.0, 0.0]])
    out = keras.layers.Dense(2, kernel_initializer=kernel, name="head_logits")(y)
    return keras.Model(inputs, out)


def test_gradcam_peaks_where_the_evidence_is():
    model = quadrant_model()
    img = np.full((2, 16, 16, 1), 200, np.uint8)
    cam = grad_cam(model, img, np.array([0, 0]), layer_name="feat_out")
    assert cam.shape == (2, 16, 16)
    assert cam.std() > 0.1, "heatmap must not be constant"
    assert cam[:, :6, :6].mean() > 0.9 and cam[:, 10:, 10:].mean() < 0.1


def test_gradcam_on_the_residual_cnn_finds_the_last_block():
    from tests.conftest import tiny_data, tiny_model

    model = tiny_model()
    assert last_spatial_layer(model.get_layer("backbone")) == "stage3_block1_out"
    x, _ = tiny_data(3)
    cam = grad_cam(model, x, np.array([0, 1, 2]))
    assert cam.shape == (3, 8, 8) and np.isfinite(cam).all() and cam.max() <= 1.0
