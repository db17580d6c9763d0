"""Blocks from layer names: how a Keras model's layers group into the blocks that strategies freeze and train.

keras.applications, keras-hub and most hand-written networks name their layers after the block they belong to
(``block1a_dwconv``, ``conv2_block1_1_conv``, ``stage2_conv``); `derive_blocks` reads those names.
"""

from __future__ import annotations

import re

from keras_transfer.errors import ConfigError

_STATISTICS = ("mean", "variance", "count", "moving_mean", "moving_variance")


def _block_key(name):
    """The block a layer name announces: its tokens up to the first with a digit (``block1a_dwconv`` ->
    ``block1``, ``conv2_block1_1_conv`` -> ``conv2``, ``block_3_expand`` -> ``block_3_``), else its first token
    (``stem_conv`` -> ``stem``)."""
    tokens = name.split("_")
    for i, t in enumerate(tokens):
        if re.search(r"\d", t):
            short = re.sub(r"(\d+)[A-Za-z]+$", r"\1", t)  # EfficientNet's sub-blocks (block1a, block1b): one block
            key = "_".join(tokens[:i] + [short])
            return key + "_" if t.isdigit() and i + 1 < len(tokens) else key
    return tokens[0]


def _learns(layer):
    """Whether a layer has weights a strategy would train (statistics such as BatchNorm's or a
    Normalization layer's are not)."""
    return any(v.name not in _STATISTICS for v in layer.weights)


def _snake(class_name):
    """Keras' automatic layer name for a class (``Conv2D`` -> ``conv2d``, ``BatchNormalization`` ->
    ``batch_normalization``)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _anonymous(layer):
    """Whether ``layer`` kept the name Keras gave it (``conv2d_5``, ``batch_normalization``, ``add_3``): a name
    that says nothing about its block."""
    return re.sub(r"_\d+$", "", layer.name) == _snake(type(layer).__name__)


def _contains(name, key):
    return re.search(rf"(^|_){re.escape(key.rstrip('_'))}(_|$)", name) is not None


def assign_blocks(blocks, names):
    """Each layer name's block by the prefix rule of `keras_transfer.models.ModelSpec.layer_blocks`: the block
    with the longest matching prefix, else the block of the layer before (the first block for leading layers)."""
    out, current = [], blocks[0]
    for name in names:
        matches = [b for b in blocks if name.startswith(b)]
        current = max(matches, key=len) if matches else current
        out.append(current)
    return out


def derive_blocks(model):
    """Block names (layer-name prefixes, input to output) derived from ``model``'s layer names.

    Consecutive layers that announce the same block (`_block_key`), or whose name contains a numbered block
    before them (MobileNetV2's ``bn_Conv1`` after ``Conv1``), form one block; a layer Keras named by its class
    (``conv2d_5``, Xception's and InceptionV3's) belongs to the block before it, and those before any named
    layer to a block ``stem``; a run of layers without weights (padding, pooling, activations, the input) joins
    the block before it. keras.applications' EfficientNet gives ``stem, block1 .. block7, top``; ResNet50
    ``conv1 .. conv5``; VGG16 ``block1 .. block5``; MobileNetV2 ``Conv1, expanded, block_1_ .. block_16_,
    Conv_1``; DenseNet121 ``conv1 .. conv5`` with its transitions ``pool2 .. pool4`` and its last ``bn``; Xception
    ``block1 .. block14``; InceptionV3 ``stem, mixed0 .. mixed9`` (``mixed10``, the last concatenation, has no
    weights and closes ``mixed9``).

    Raises:
        ConfigError: when a block's layers are not together in the model's layer order, or no layer has
            weights: name the blocks yourself (``register_backbone(blocks=...)``).
    """
    groups = []  # [key, learns, [layer names]]
    for layer in model.layers:
        name, learns = layer.name, _learns(layer)
        last = groups[-1][0] if groups else None
        if _anonymous(layer):
            key = last if groups else ""
        elif last and re.search(r"\d", last) and _contains(name, last):
            key = last
        else:
            key = _block_key(name)
        if groups and key == last:
            groups[-1][1] |= learns
            groups[-1][2].append(name)
        else:
            groups.append([key, learns, [name]])
    blocks, owner = [], {}
    for key, learns, names in groups:
        if learns:
            key = key or "stem"
            if key in blocks and key != blocks[-1]:
                raise ConfigError(f"Could not derive blocks from the layer names of {model.name}: expected each "
                                  f"block's layers together, in order. Received: {key!r} again at {names[0]!r}; "
                                  f"pass blocks=")
            if key not in blocks:
                blocks.append(key)
        for name in names:
            owner[name] = key if learns else None
    if not blocks:
        raise ConfigError(f"Could not derive blocks of {model.name}: expected layers with weights. Received none")
    names = [layer.name for layer in model.layers]
    for name, block in zip(names, assign_blocks(blocks, names)):
        if owner[name] is not None and owner[name] != block:
            raise ConfigError(f"Could not derive blocks from the layer names of {model.name}: expected the layer "
                              f"{name!r} in block {owner[name]!r} by its name. Received: {block!r} by prefix; pass "
                              f"blocks=")
    return tuple(blocks)
