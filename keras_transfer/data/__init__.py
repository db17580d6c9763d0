"""Datasets, splits, augmentation presets and input pipelines."""

from keras_transfer.data.registry import REGISTRY, Dataset, is_present, list_datasets, load_dataset
from keras_transfer.data.splits import stratified_split, subsample, train_val_test

__all__ = ["REGISTRY", "Dataset", "is_present", "list_datasets", "load_dataset",
           "stratified_split", "subsample", "train_val_test"]
