"""Backbones (registry + factory) and the classifier wrapper."""

from keras_transfer.models.classifier import (
                                              build_classifier,
                                              channel_stats,
                                              copy_backbone,
                                              create_backbone,
                                              head_layers,
                                              initialise_from_data,
)
from keras_transfer.models.registry import ModelSpec, get_spec, list_models, register_model

__all__ = ["ModelSpec", "build_classifier", "channel_stats", "copy_backbone", "create_backbone",
           "get_spec", "head_layers", "initialise_from_data", "list_models", "register_model"]
