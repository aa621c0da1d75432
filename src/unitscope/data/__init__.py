"""Datasets by name: built-in synthetic and bundled data, image folders, local torchvision data."""

from .arrays import ArrayDataset, dataset_fingerprint
from .registry import DATASETS, load_dataset

__all__ = ["DATASETS", "ArrayDataset", "dataset_fingerprint", "load_dataset"]
