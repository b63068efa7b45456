"""Datasets: the catalogue of names, readers of their files, and the batch pipelines.

Attributes are imported on first use (``keras_local._lazy``), so reading the catalogue
starts no Keras backend.
"""

from keras_local._lazy import lazy_exports

_EXPORTS = {
    "DATASETS": "keras_local.data.catalogue",
    "DatasetInfo": "keras_local.data.catalogue",
    "dataset_info": "keras_local.data.catalogue",
    "get_dataset_info": "keras_local.data.catalogue",
    "list_datasets": "keras_local.data.catalogue",
    "register_dataset": "keras_local.data.catalogue",
    "DataFileError": "keras_local.data.idx",
    "read_idx": "keras_local.data.idx",
    "write_idx": "keras_local.data.idx",
    "DatasetUnavailableError": "keras_local.data.loading",
    "load_arrays": "keras_local.data.loading",
    "augment_batch": "keras_local.data.pipeline",
    "class_limited_order": "keras_local.data.pipeline",
    "cutout": "keras_local.data.pipeline",
    "make_datasets": "keras_local.data.pipeline",
    "make_numpy_datasets": "keras_local.data.pipeline",
    "normalise": "keras_local.data.pipeline",
    "tensorflow_available": "keras_local.data.pipeline",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
