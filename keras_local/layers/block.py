"""LocalBlock: encoder -> BatchNorm -> nonlinearity -> dropout, owning its local heads."""

import keras
from keras import ops

from keras_local.kernels import fast_paths
from keras_local.layers.batch_norm import TorchBatchNormalization
from keras_local.layers.dropout import Dropout
from keras_local.layers.feedback import LabelProjection
from keras_local.layers.heads import PredHead, ReconstructionHead, SimHead, torch_bias_initializer
from keras_local.layers.heads import torch_kernel_initializer
from keras_local.losses.registry import LocalLossInputs, get_local_loss
from keras_local.losses.maths import error_percent

BLOCK_KINDS = ("dense", "conv")

# Every random part of a block draws from its own seed: block_seed + offset. Keras's
# seeded initialisers replay the same stream for the same integer, so two parts (or two
# blocks, see keras_local.models.common.SEED_STRIDE) sharing a seed would start as scaled copies of each other.
SEED_OFFSETS = {"encoder": 0, "dropout": 1, "sim_head": 2, "projection": 3, "feedback": 4,
                "encoder_bias": 5, "pred_bias": 6, "decoder": 7, "decoder_bias": 8}


def part_seed(block_seed, part):
    """The seed of one random ``part`` of a block seeded ``block_seed`` (None stays None)."""
    return None if block_seed is None else block_seed + SEED_OFFSETS[part]


@keras.saving.register_keras_serializable(package="keras_local")
class LocalBlock(keras.layers.Layer):
    """One hidden layer trained by its own local loss.

    Args:
        kind: "dense" or "conv" (3x3 stride 1 'same' unless kernel_size/strides say
            otherwise; a strided conv pads ``kernel_size // 2`` on each side).
        width: units (dense) or filters (conv).
        num_classes: classes of the pred head and of the label similarity.
        local_loss: name in ``LOCAL_LOSSES`` ("pred", "sim", "predsim"), or None for
            a plain layer without heads (backprop baseline).
        bio: back-prop-free heads (feedback alignment, no sim conv, random label
            projection of ``target_proj_size``).
        unsup_loss: None, or an unsupervised term of ``LOCAL_LOSSES`` ("unsup_sim",
            "unsup_recon"); the block then trains on alpha * unsup + (1 - alpha) * sup.
        first_layer: the network's first block, which has no "unsup_recon" term (as in
            the reference; its supervised loss is still weighted 1 - alpha).
        similarity_std: reduce feature maps to their spatial std in S(.) (the
            reference's --no-similarity-std turns it off).

    ``call(x, training, labels=onehot)`` adds the local loss with ``add_loss`` and
    updates the block's metrics: ``<name>_pred_loss``, ``<name>_sim_loss`` and
    ``<name>_error`` (local-head error in %). Without labels it is a plain layer.
    """

    # The update rule may run this block's dropout after its gradients (call(dropout=False)
    # then ``block.dropout`` on the output); blocks with structured outputs opt out.
    defers_dropout = True

    def __init__(self, kind, width, num_classes, kernel_size=3, strides=1,
                 batch_norm=True, nonlin="relu", dropout=0.0, local_loss="predsim",
                 beta=0.99, dim_in_decoder=4096, bio=False, target_proj_size=128,
                 seed=None, use_bias=True, unsup_loss=None, alpha=0.0, first_layer=False,
                 similarity_std=True, **kwargs):
        super().__init__(**kwargs)
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {kind!r}; choose one of {', '.join(BLOCK_KINDS)}")
        self.kind = kind
        self.width = width
        self.num_classes = num_classes
        self.kernel_size = kernel_size
        self.strides = strides
        self.batch_norm = batch_norm
        self.nonlin = nonlin
        self.dropout_rate = dropout
        self.local_loss_name = local_loss
        self.beta = beta
        self.dim_in_decoder = dim_in_decoder
        self.bio = bio
        self.target_proj_size = target_proj_size
        self.seed = seed
        self.use_bias = use_bias  # encoder bias (ResNets' convs have none)
        self.local_loss_spec = get_local_loss(local_loss) if local_loss else None
        self.unsup_loss_name = unsup_loss
        self.alpha = alpha
        self.first_layer = first_layer
        self.similarity_std = similarity_std
        self.unsup_loss_spec = None
        if unsup_loss and local_loss and not (first_layer and unsup_loss == "unsup_recon"):
            self.unsup_loss_spec = get_local_loss(unsup_loss)

        policy = self.dtype_policy
        if kind == "conv":
            self.encoder_padding = None
            if strides != 1:
                self.encoder_padding = keras.layers.ZeroPadding2D(
                    kernel_size // 2, dtype=policy, name=f"{self.name}_encoder_padding")
            self.encoder = keras.layers.Conv2D(
                width, kernel_size, strides=strides,
                padding="same" if strides == 1 else "valid", use_bias=use_bias,
                kernel_initializer=torch_kernel_initializer(part_seed(seed, "encoder")),
                dtype=policy, name=f"{self.name}_encoder")
        else:
            self.encoder_padding = None
            self.encoder = keras.layers.Dense(
                width, kernel_initializer=torch_kernel_initializer(part_seed(seed, "encoder")),
                dtype=policy, use_bias=use_bias,
                name=f"{self.name}_encoder")
        # PyTorch BatchNorm defaults: running-average momentum 0.1, eps 1e-5, unbiased
        # moving variance.
        self.bn = (TorchBatchNormalization(momentum=0.9, epsilon=1e-5, dtype=policy,
                                                   name=f"{self.name}_bn") if batch_norm else None)
        if nonlin == "leakyrelu":
            self.activation = keras.layers.LeakyReLU(negative_slope=0.01, dtype=policy, name=f"{self.name}_act")
        else:
            self.activation = keras.layers.ReLU(dtype=policy, name=f"{self.name}_act")
        self.dropout = None
        if dropout > 0:
            dropout_cls = keras.layers.SpatialDropout2D if kind == "conv" else Dropout
            self.dropout = dropout_cls(dropout, seed=part_seed(seed, "dropout"), dtype=policy,
                                       name=f"{self.name}_dropout")

        self.heads = {}
        self.projection = None
        self.local_metrics = {}
        if self.local_loss_spec is not None:
            needed = {head for spec in self._loss_specs() for head in spec.heads}
            if bio:
                self.projection = LabelProjection(
                    num_classes, target_proj_size, seed=part_seed(seed, "projection"),
                    name=f"{self.name}_label_projection")
            if "pred" in needed:
                self.heads["pred"] = PredHead(num_classes, dim_in_decoder, self.projection,
                                              seed=part_seed(seed, "feedback"),
                                              bias_seed=part_seed(seed, "pred_bias"), dtype=policy,
                                              name=f"{self.name}_pred_head")
            if "sim" in needed:
                self.heads["sim"] = SimHead(dim_in_decoder, self.projection,
                                            seed=part_seed(seed, "sim_head"),
                                            similarity_std=similarity_std,
                                            dtype=policy, name=f"{self.name}_sim_head")
            if "decoder" in needed:
                self.heads["decoder"] = ReconstructionHead(
                    kernel_size, strides, nonlin, seed=part_seed(seed, "decoder"),
                    bias_seed=part_seed(seed, "decoder_bias"), dtype=policy,
                    name=f"{self.name}_recon_head")

    @property
    def has_heads(self):
        return bool(self.heads)

    def inference_layers(self):
        """The layers that remain for deployment, in order: no heads, no dropout."""
        return [layer for layer in (self.encoder_padding, self.encoder, self.bn, self.activation)
                if layer is not None]

    def build(self, input_shape):
        shape = tuple(input_shape)
        receptive_field = self.kernel_size**2 if self.kind == "conv" else 1
        self.encoder.bias_initializer = torch_bias_initializer(
            shape[-1] * receptive_field, part_seed(self.seed, "encoder_bias"))
        for layer in self.inference_layers():
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        if self.dropout is not None:
            self.dropout.build(shape)
        if self.projection is not None:
            self.projection.build((None, self.num_classes))
        for name, head in self.heads.items():
            if name == "decoder":
                head.build(shape, tuple(input_shape))
            else:
                head.build(shape)
        self.build_metrics()

    def build_metrics(self):
        """The block's metrics, created with its weights: under layer-wise placement their
        variables then sit on the block's device, where the step updates them."""
        if self.local_loss_spec is None:
            return
        for term in [term for spec in self._loss_specs() for term in spec.metrics]:
            self.local_metrics[term] = keras.metrics.Mean(name=f"{self.name}_{term}")
        if "pred" in self.local_loss_spec.heads:
            self.local_metrics["error"] = keras.metrics.Mean(name=f"{self.name}_error")

    def _loss_specs(self):
        """The block's local loss spec and, if any, its unsupervised one."""
        return [self.local_loss_spec] + ([self.unsup_loss_spec] if self.unsup_loss_spec else [])

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.inference_layers():
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def features(self, inputs, training=None):
        """h: the output of the nonlinearity, before dropout (what the heads read)."""
        h = inputs
        if self.encoder_padding is not None:
            h = self.encoder_padding(h)
        h = self.encoder(h)
        leaky_training = training and self.nonlin == "leakyrelu"
        slope = self.activation.negative_slope if leaky_training else None
        if leaky_training and self.bn is not None:
            fused = self.bn.leaky_relu_training(h, slope)
            if fused is not None:
                return fused
        if self.bn is not None:
            h = self.bn(h, training=training)
        if leaky_training:
            fast = fast_paths().leaky_relu(h, slope)
            if fast is not None:
                return fast
        return self.activation(h)

    def call(self, inputs, training=None, labels=None, dropout=True):
        """``dropout=False``: return h without the block's dropout (the update rule then
        applies ``self.dropout`` itself after the block's gradients)."""
        chunked = None
        if labels is not None and self.has_heads and training:
            chunked = fast_paths().block_forward(self, inputs)
        h, summaries = chunked if chunked is not None else (
            self.features(inputs, training=training), None)
        if labels is not None and self.has_heads:
            self.add_loss(self.local_loss(inputs, h, labels, summaries))
        if dropout and self.dropout is not None:
            h = self.dropout(h, training=training)
        return h

    def local_loss(self, inputs, h, labels_onehot, summaries=None):
        """This block's local loss on h (``inputs``: the block's input; ``summaries``: what
        the heads read of h, computed already); updates the block's metrics (every
        declared term, and the local-head error)."""
        loss_inputs = LocalLossInputs(heads=self.heads, inputs=inputs, h=h,
                                      labels_onehot=labels_onehot, beta=self.beta, block=self,
                                      summaries=summaries)
        terms = self.local_loss_spec.compute(loss_inputs)
        loss = terms["loss"]
        if self.unsup_loss_spec is not None:
            unsup = self.unsup_loss_spec.compute(loss_inputs)
            terms.update({term: unsup[term] for term in self.unsup_loss_spec.metrics})
            loss = self.alpha * unsup["loss"] + (1.0 - self.alpha) * loss
        elif self.alpha:
            loss = (1.0 - self.alpha) * loss
        batch = ops.cast(ops.shape(h)[0], "float32")
        for term in self.local_metrics:
            if term == "error":
                continue
            self.local_metrics[term].update_state(terms[term], sample_weight=batch)
        if "error" in self.local_metrics and "scores" in terms:
            labels = ops.argmax(labels_onehot, axis=-1)
            self.local_metrics["error"].update_state(
                error_percent(terms["scores"], labels), sample_weight=batch)
        return loss

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind, "width": self.width, "num_classes": self.num_classes,
            "kernel_size": self.kernel_size, "strides": self.strides,
            "batch_norm": self.batch_norm, "nonlin": self.nonlin, "dropout": self.dropout_rate,
            "local_loss": self.local_loss_name, "beta": self.beta,
            "dim_in_decoder": self.dim_in_decoder, "bio": self.bio,
            "target_proj_size": self.target_proj_size, "seed": self.seed,
            "use_bias": self.use_bias,
            "unsup_loss": self.unsup_loss_name, "alpha": self.alpha,
            "first_layer": self.first_layer, "similarity_std": self.similarity_std,
        }

