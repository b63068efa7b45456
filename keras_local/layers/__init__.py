"""The layers of a local network: the block, its heads and the feedback-alignment parts."""

from keras_local.layers.batch_norm import TorchBatchNormalization
from keras_local.layers.block import LocalBlock
from keras_local.layers.feedback import FeedbackAlignmentDense, LabelProjection
from keras_local.layers.heads import DecoderPooling, PredHead, SimHead, decoder_pool_geometry

__all__ = ["LocalBlock", "FeedbackAlignmentDense", "LabelProjection", "DecoderPooling",
           "PredHead", "SimHead", "decoder_pool_geometry", "TorchBatchNormalization"]
