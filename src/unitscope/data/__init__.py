"""Datasets by name: built-in synthetic and bundled data, image folders, local torchvision data."""

from .arrays import ArrayDataset, dataset_fingerprint
from .registry import DATASETS, DatasetError, DatasetNotFoundError, load_dataset
from .shapes import ShapesDataset

__all__ = ["DATASETS", "ArrayDataset", "DatasetError", "DatasetNotFoundError", "ShapesDataset",
           "dataset_fingerprint", "load_dataset"]
