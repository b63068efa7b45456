"""keras-local: deep networks trained without global backpropagation (Nøkland & Eidnes 2019).

Attributes are imported on first use (``keras_local._lazy``): ``import keras_local`` starts
no Keras backend.
"""

from keras_local._lazy import lazy_exports

_EXPORTS = {
    "Config": "keras_local.config",
    "NetworkConfig": "keras_local.config",
    "RunConfig": "keras_local.config",
    "option": "keras_local.config",
    "LocalBlock": "keras_local.layers",
    "FeedbackAlignmentDense": "keras_local.layers",
    "LabelProjection": "keras_local.layers",
    "PredHead": "keras_local.layers",
    "SimHead": "keras_local.layers",
    "decoder_pool_geometry": "keras_local.layers",
    "LOCAL_LOSSES": "keras_local.losses.registry",
    "LocalLossInputs": "keras_local.losses.registry",
    "list_local_losses": "keras_local.losses.registry",
    "register_local_loss": "keras_local.losses.registry",
    "LocalModel": "keras_local.models",
    "build_model": "keras_local.run.training",
    "quiet_start": "keras_local.run.quiet",
    "milestone_scheduler": "keras_local.run.callbacks",
    "export_model": "keras_local.exporting",
    "load_model": "keras_local.models",
    "list_models": "keras_local.models",
    "register_model": "keras_local.models",
    "VGG_CHANNELS": "keras_local.models.vgg",
    "list_datasets": "keras_local.data.catalogue",
    "make_optimizer": "keras_local.optimizers",
    "TorchAdam": "keras_local.optimizers",
    "TorchSGD": "keras_local.optimizers",
    "TorchBatchNormalization": "keras_local.layers.batch_norm",
    "milestone_learning_rate": "keras_local.optimizers",
    "binary_pred_loss": "keras_local.losses.maths",
    "pred_loss": "keras_local.losses.maths",
    "predsim_loss": "keras_local.losses.maths",
    "sim_loss": "keras_local.losses.maths",
    "similarity_matrix": "keras_local.losses.maths",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
