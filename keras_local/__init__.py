"""keras-local: deep networks trained without global backpropagation (Nøkland & Eidnes 2019)."""

from keras_local.architectures import ARCHITECTURES, VGG_CHANNELS
from keras_local.blocks import LocalBlock
from keras_local.config import Config
from keras_local.feedback import FeedbackAlignmentDense, LabelProjection
from keras_local.heads import PredHead, SimHead, decoder_pool_geometry
from keras_local.local_losses import LOCAL_LOSSES, register_local_loss
from keras_local.model import LocalModel, build_model
from keras_local.optim import make_optimizer, milestone_learning_rate
from keras_local.similarity import (
    binary_pred_loss,
    pred_loss,
    predsim_loss,
    sim_loss,
    similarity_matrix,
)

__all__ = [
    "ARCHITECTURES", "VGG_CHANNELS", "LocalBlock", "Config", "FeedbackAlignmentDense",
    "LabelProjection", "PredHead", "SimHead", "decoder_pool_geometry", "LOCAL_LOSSES",
    "register_local_loss", "LocalModel", "build_model", "make_optimizer",
    "milestone_learning_rate", "binary_pred_loss", "pred_loss", "predsim_loss", "sim_loss",
    "similarity_matrix",
]
