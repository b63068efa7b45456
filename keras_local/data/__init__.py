"""Datasets: the catalogue of names, readers of their files, and the batch pipelines."""

from keras_local.data.catalogue import DATASETS, DatasetInfo, get_dataset_info, list_datasets
from keras_local.data.idx import DataFileError, read_idx, write_idx
from keras_local.data.loading import DatasetUnavailableError, load_arrays
from keras_local.data.pipeline import (
    augment_image,
    class_limited_order,
    cutout,
    make_datasets,
    make_numpy_datasets,
    normalise,
    tensorflow_available,
)

__all__ = ["DATASETS", "DatasetInfo", "get_dataset_info", "list_datasets", "DataFileError",
           "read_idx", "write_idx", "DatasetUnavailableError", "load_arrays", "augment_image",
           "class_limited_order", "cutout", "make_datasets", "make_numpy_datasets", "normalise",
           "tensorflow_available"]
