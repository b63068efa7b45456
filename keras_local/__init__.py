"""keras-local: deep networks trained without global backpropagation (Nøkland & Eidnes 2019)."""

from keras_local.layers import (
    FeedbackAlignmentDense,
    LabelProjection,
    LocalBlock,
    PredHead,
    SimHead,
    decoder_pool_geometry,
)
from keras_local.config import Config
from keras_local.losses import LOCAL_LOSSES, LocalLossInputs, list_local_losses, register_local_loss
from keras_local.models import LocalModel, build_model, list_models, register_model
from keras_local.models.vgg import VGG_CHANNELS
from keras_local.optim import make_optimizer, milestone_learning_rate
from keras_local.optimizers import TorchAdam, TorchSGD
from keras_local.layers.batch_norm import TorchBatchNormalization
from keras_local.losses import (
    binary_pred_loss,
    pred_loss,
    predsim_loss,
    sim_loss,
    similarity_matrix,
)

__all__ = [
    "list_models", "register_model", "VGG_CHANNELS", "LocalBlock", "Config", "FeedbackAlignmentDense",
    "LabelProjection", "PredHead", "SimHead", "decoder_pool_geometry", "LOCAL_LOSSES",
    "register_local_loss", "LocalLossInputs", "list_local_losses", "LocalModel", "build_model", "make_optimizer",
    "milestone_learning_rate", "binary_pred_loss", "pred_loss", "predsim_loss", "sim_loss",
    "similarity_matrix", "TorchAdam", "TorchSGD", "TorchBatchNormalization",
]
