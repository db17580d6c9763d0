"""Model registry: one builder per backbone, each with its input contract and blocks.

Like timm's ``default_cfg``, every entry declares the input it expects (size,
channels, value range, normalisation) and its named blocks, in order from the
input, so that freezing strategies are written once for all models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import warnings

import keras
import numpy as np

from keras_transfer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered backbone.

    Attributes:
        name: str.
        builder: callable ``(input_shape, weights, **options) -> keras.Model``.
        default_size: int. Default input side.
        min_size: int. Smallest input side the architecture accepts.
        channels: int. Channels of the backbone input (RGB = 3).
        value_range: str. ``unit`` (0..1 then mean/std normalised), ``-1-1``, ``torch`` (0..1 normalised with
            ImageNet's channel mean and sd), ``caffe`` (BGR minus ImageNet's mean) or ``0-255``
            (the backbone normalises inside, as keras.applications EfficientNet).
        blocks: tuple of str. Layer-name prefixes of the blocks, input to output.
        gradcam_layer: str. Output of the last spatial layer (Grad-CAM target).
        description: str.
        data_init: callable ``(backbone, x) -> None`` or None. Data-dependent initialisation on
            normalised training images ``x``, run before training from scratch.
        fixed_layers: tuple of str. Layers that no strategy trains (airbench's whitening conv, set
            from the data by ``data_init``).
        patterns: dict or None. ``{block: (layer-name prefixes)}`` where a block's layers are not named after
            it (`keras_transfer.api.register_backbone`); None: each block's name is its prefix.
        builtin: bool. One of this package's own entries (listed by ``ktransfer models``).
    """

    name: str
    builder: object
    default_size: int
    min_size: int
    channels: int
    value_range: str
    blocks: tuple
    gradcam_layer: str
    description: str = ""
    data_init: object = None
    fixed_layers: tuple = ()
    patterns: dict = None
    builtin: bool = True

    def block_of(self, layer_name):
        """The block with the longest prefix of ``layer_name``, or ``None``."""
        patterns = self.patterns or {b: (b,) for b in self.blocks}
        matches = [(len(p), b) for b, prefixes in patterns.items() for p in prefixes if layer_name.startswith(p)]
        return max(matches)[1] if matches else None

    def matches(self, backbone):
        """Whether ``backbone``'s layers hold this model's last block (a backbone of this model)."""
        return any(self.block_of(layer.name) == self.blocks[-1] for layer in backbone.layers)

    def layer_blocks(self, backbone):
        """Map each backbone layer name to its block, in layer order.

        A layer whose name matches no block (a BN or activation named after its
        op, an input rescaling) belongs to the block of the layer before it, or
        to the first block when it comes first.
        """
        out, current = {}, self.blocks[0]
        for layer in backbone.layers:
            current = self.block_of(layer.name) or current
            out[layer.name] = current
        return out


_REGISTRY: dict = {}


def register_model(spec):
    _REGISTRY[spec.name] = spec
    return spec


def list_models(builtin_only=False):
    """Registered model names; ``builtin_only``: this package's own, without the keras.applications models
    registered by name or the models registered from Python in this process."""
    return sorted(n for n, s in _REGISTRY.items() if s.builtin or not builtin_only)


def get_spec(name):
    """The registered model ``name``; any other keras.applications model by name (`application_spec`)."""
    if name not in _REGISTRY and isinstance(name, str):  # EfficientNetB0 is efficientnet_b0
        same = [n for n in _REGISTRY if n.replace("_", "").lower() == name.replace("_", "").lower()]
        if same:
            return _REGISTRY[same[0]]
    if name not in _REGISTRY:
        spec = application_spec(name) if isinstance(name, str) else None
        if spec is None:
            raise ConfigError(f"Unknown model: expected one of {list_models(True)} or a keras.applications model "
                              f"(e.g. DenseNet121, convnext_tiny). Received: {name!r}")
        register_model(spec)
    return _REGISTRY[name]


def _application_fn(name):
    """The keras.applications function that ``name`` names, ignoring case and underscores (``densenet121``,
    ``convnext_tiny``, ``EfficientNetV2B0``), or None."""
    key = name.replace("_", "").lower()
    for fn in dir(keras.applications):
        if fn[:1].isupper() and fn.lower() == key and callable(getattr(keras.applications, fn)):
            return fn
    return None


_PROBE = np.array([[[[0.0, 127.5, 255.0], [10.0, 20.0, 30.0]]]], "float32")
VALUE_RANGES = {
    "0-255": lambda x: x,
    "-1-1": lambda x: x / 127.5 - 1.0,
    "torch": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    "caffe": lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68]),
}


def _value_range_of(fn_name):
    """The input contract of a keras.applications model, read from what its module's ``preprocess_input`` does
    to a probe image: ``0-255`` (the model normalises inside), ``-1-1``, ``torch`` (ImageNet mean and sd) or
    ``caffe``."""
    module = getattr(keras.applications, getattr(keras.applications, fn_name).__module__.rsplit(".", 1)[-1], None)
    preprocess = getattr(module, "preprocess_input", None)
    if preprocess is None:
        raise ConfigError(f"keras.applications.{fn_name}: expected a preprocess_input beside it. Received: none")
    out = np.asarray(keras.ops.convert_to_numpy(preprocess(_PROBE.copy())))
    for value_range, f in VALUE_RANGES.items():
        if out.shape == _PROBE.shape and np.allclose(out, f(_PROBE), atol=1e-3):
            return value_range
    raise ConfigError(f"keras.applications.{fn_name}: expected its preprocess_input to be one of "
                      f"{', '.join(VALUE_RANGES)}. Received: another transform")


def application_spec(name):
    """A `ModelSpec` for any keras.applications model by name (None when there is none): blocks derived from its
    layer names (`keras_transfer.models.blocks.derive_blocks`), the input contract read from its
    ``preprocess_input``, default input 224×224 RGB, Grad-CAM on its last feature map. Weights: ImageNet
    through Keras' own download, or a local file."""
    fn_name = _application_fn(name)
    if fn_name is None:
        return None
    from keras_transfer.models.blocks import derive_blocks

    fn = getattr(keras.applications, fn_name)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fn(include_top=False, weights=None, input_shape=(224, 224, 3))
    maps = [layer.name for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4]
    try:
        blocks = derive_blocks(model)
    except ConfigError as e:  # said for the command line: the Python API takes the blocks by hand
        raise ConfigError(str(e).replace("; pass blocks=", "; register it from Python with "
                                         "keras_transfer.register_backbone(..., blocks=[...])")) from None
    return ModelSpec(name, _applications_builder(fn_name, None), 224, 32, 3, _value_range_of(fn_name),
                     blocks, maps[-1], f"keras.applications {fn_name} (blocks from its layer names)", builtin=False)


def load_weights_file(model, path):
    """``model.load_weights(path)``, or a one-line `ConfigError` saying why the file does not fit the model."""
    if path == "imagenet":
        raise ConfigError(f"ImageNet weights exist for keras.applications models only (efficientnet_b0, vgg16, "
                          f"DenseNet121, ...): expected a weights file for {model.name}. Received: imagenet")
    try:
        model.load_weights(path)
    except Exception as e:  # a missing or foreign file, another architecture or width
        raise ConfigError(f"Could not load the weights file {path} into {model.name}: expected weights saved from "
                          f"the same architecture (model.weights). Received: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _resnet_builder(input_shape, weights=None, widths=(64, 128, 256), blocks_per_stage=1,
                    batch_norm=True, dropout=0.1, pooling="avg"):
    from keras_transfer.models.resnet import residual_cnn

    model = residual_cnn(input_shape, tuple(widths), blocks_per_stage, batch_norm, dropout, pooling)
    if weights not in (None, "none"):
        load_weights_file(model, weights)
    return model


def resnet_blocks(widths=(64, 128, 256), blocks_per_stage=1):
    return ("stem",) + tuple(f"stage{s}_block{b}" for s in range(1, len(widths) + 1)
                             for b in range(1, blocks_per_stage + 1))


register_model(ModelSpec(
    "resnet", _resnet_builder, 32, 8, 3, "unit", resnet_blocks(), "stage3_block1_out",
    "CIFAR-10 seed residual CNN (Conv-BN-ELU-SpatialDropout-Conv-BN + skip; 64/128/256)"))


def _airbench_builder(input_shape, weights=None, widths=(64, 256, 256), bn_bias_lr=64.0, **_):
    from keras_transfer.models.airbench import airbench_cnn

    model = airbench_cnn(input_shape, tuple(widths), bn_bias_lr)
    if weights not in (None, "none"):
        load_weights_file(model, weights)
    return model


def _airbench_init(backbone, x):
    from keras_transfer.models.airbench import init_whitening

    init_whitening(backbone, x)


register_model(ModelSpec(
    "airbench", _airbench_builder, 32, 16, 3, "unit", ("whiten", "group1", "group2", "group3"),
    "group3_gelu2", "fast CIFAR-10 net after airbench94 (whitening conv, 64/256/256 conv groups)",
    data_init=_airbench_init, fixed_layers=("whiten_conv",)))


def _applications_builder(fn_name, file_name):
    def build(input_shape, weights=None, **_):
        fn = getattr(keras.applications, fn_name)
        w = None if weights in (None, "none") else weights
        if w not in (None, "imagenet") and not os.path.exists(w):
            raise ConfigError(f"Expected a local weights file for {fn_name}. Received: {w!r} does not exist")
        # Keras prints "Downloading data from ..." and warns about the input size before it fails offline:
        # held back, and shown only when the model was built, so a failure is the one line below.
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                base = fn(include_top=False, weights=w, input_shape=tuple(input_shape))
            sys.stdout.write(out.getvalue())
            for c in caught:
                warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
        except Exception as e:  # offline download failure, bad file, wrong shape
            if w == "imagenet":
                home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
                cache = os.path.join(home, "models")  # where keras.utils.get_file keeps it
                named = re.search(r"/([^/\s:]+\.h5)", str(e))  # Keras' error names the URL it fetched
                name = file_name or (named.group(1) if named else "the file of the URL below")
                raise ConfigError(
                    f"ImageNet weights for {fn_name} could not be loaded (offline?): place "
                    f"{name} in {cache} or pass --weights PATH. Received: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
            raise ConfigError(f"Could not build {fn_name} with weights={w!r} and input "
                              f"{tuple(input_shape)}. Received: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}") from e
        x = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
        return keras.Model(base.input, x, name="backbone")
    return build


register_model(ModelSpec(
    "efficientnet_b0", _applications_builder("EfficientNetB0", "efficientnetb0_notop.h5"),
    224, 32, 3, "0-255", ("stem", "block1", "block2", "block3", "block4", "block5", "block6", "block7", "top"),
    "top_activation", "keras.applications EfficientNetB0 (5.3 M with ImageNet head)"))
register_model(ModelSpec(
    "mobilenet_v2",
    _applications_builder("MobileNetV2", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    224, 32, 3, "-1-1",
    ("Conv1", "expanded_conv") + tuple(f"block_{i}_" for i in range(1, 17)) + ("Conv_1",), "out_relu",
    "keras.applications MobileNetV2 (alpha 1.0)"))
register_model(ModelSpec(
    "vgg16", _applications_builder("VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    224, 32, 3, "caffe", ("block1", "block2", "block3", "block4", "block5"), "block5_conv3",
    "keras.applications VGG16 (14.7 M without its dense top)"))
register_model(ModelSpec(
    "resnet50", _applications_builder("ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    224, 32, 3, "caffe", ("conv1", "conv2", "conv3", "conv4", "conv5"), "conv5_block3_out",
    "keras.applications ResNet50"))
