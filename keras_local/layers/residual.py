"""Residual blocks as local blocks: every convolution of a residual block is a LocalBlock.

A residual block of the authors' script (``BasicBlock``, ``Bottleneck``, ``wide_basic``)
is written here as two or three consecutive ``ResidualConv`` layers that pass a tuple:

    first   x          -> (h1, x)          conv 1 of the block
    middle  (h1, x)    -> (h2, x)          conv 2 of a bottleneck
    last    (h, x)     -> out              its conv, then + shortcut(x), trained together

so the update rule (``keras_local.steps.rule``) needs nothing special: each conv with heads
ends a segment, the segment boundary stops the gradient of the whole tuple, and the
shortcut (1x1 conv [+ BatchNorm], or identity) lives in the last conv's layer and is
trained by that conv's local loss. ``order`` follows the script's LocalLossBlockConv:

    "post"  conv -> BN -> (+ shortcut) -> act -> spatial dropout; heads read the act output
    "pre"   BN -> act -> spatial dropout -> conv -> (+ shortcut); heads read act(BN'(out))
    "none"  conv -> (+ shortcut);                               heads read act(BN'(out))

In "pre" and "none", BN' (``self.bn``) exists only for the local loss (the script creates
it only outside backprop mode, except for its "none" stems, see models/resnet.py).
"""

import keras

from keras_local.layers.block import LocalBlock
from keras_local.layers.dropout import Dropout

ROLES = ("plain", "first", "middle", "last")
ORDERS = ("post", "pre", "none")
SHORTCUTS = ("identity", "conv", "conv_bn")
SHORTCUT_SEED_OFFSET = 50  # the shortcut conv's seed: its block's seed + this


class ResidualConv(LocalBlock):
    """One convolution of a residual network, a conv LocalBlock (its own heads and loss).

    Args (beyond LocalBlock's):
        role: "plain" (x -> h), "first" (x -> (h, x)), "middle" ((h, x) -> (h', x)) or
            "last" ((h, x) -> out, adding ``shortcut(x)``).
        order: "post", "pre" or "none" (module docstring).
        shortcut: for role "last": "identity", "conv" (1x1 conv, stride ``shortcut_strides``)
            or "conv_bn" (1x1 conv + BatchNorm).
        shortcut_strides: stride of the shortcut conv (the residual block's stride).
        shortcut_bias: whether the shortcut conv has a bias.
        output_dropout: element-wise dropout on the output (the script's dropout between
            the two convs of a non-adapted wide ResNet block).
    """

    defers_dropout = False  # (h, shortcut input) outputs: dropout stays inside call

    def __init__(self, width, num_classes, role="plain", order="post", shortcut="identity",
                 shortcut_strides=1, shortcut_bias=False, output_dropout=0.0, **kwargs):
        if role not in ROLES:
            raise ValueError(f"unknown residual role {role!r}; choose one of {', '.join(ROLES)}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        kwargs.pop("kind", None)
        super().__init__("conv", width, num_classes, **kwargs)
        self.role = role
        self.order = order
        self.shortcut_kind = shortcut if role == "last" else "identity"
        self.shortcut_strides = shortcut_strides
        self.shortcut_bias = shortcut_bias
        self.output_dropout_rate = output_dropout
        policy = self.dtype_policy
        self.bn_pre = None
        if order == "pre" and self.bn is not None:
            # The same BatchNorm as the block's own (class and settings), on the input.
            self.bn_pre = type(self.bn).from_config(
                {**self.bn.get_config(), "name": f"{self.name}_bn_pre"})
        if order != "post" and not self.has_heads:
            self.bn = None  # BN' only normalises the local loss's input
        self.shortcut = None
        if self.shortcut_kind != "identity":
            seed = None if self.seed is None else self.seed + SHORTCUT_SEED_OFFSET
            # A head-less conv LocalBlock of which only the conv (and BN) are used, so the
            # shortcut's conv and BatchNorm are built exactly like every encoder's.
            self.shortcut = LocalBlock(
                "conv", width, num_classes, kernel_size=1, strides=shortcut_strides,
                batch_norm=self.shortcut_kind == "conv_bn" and self.batch_norm,
                use_bias=shortcut_bias, local_loss=None, seed=seed, dtype=policy,
                name=f"{self.name}_shortcut")
        self.output_dropout = None
        if output_dropout > 0:
            self.output_dropout = Dropout(
                output_dropout, seed=None if self.seed is None else self.seed + 5, dtype=policy,
                name=f"{self.name}_output_dropout")

    # ------------------------------------------------------------------ structure
    def _encoder_layers(self):
        return [layer for layer in (self.encoder_padding, self.encoder) if layer is not None]

    def _shortcut_layers(self):
        if self.shortcut is None:
            return []
        return self.shortcut.inference_layers()[:-1]  # its padding, conv, BN; no activation

    def _split(self, inputs):
        """(x, skip): the tensor this conv reads and the residual block's input."""
        if self.role in ("middle", "last"):
            x, skip = inputs
            return x, skip
        return inputs, inputs

    def inference_layers(self):
        """The main path's layers that remain for deployment (the shortcut's come from
        ``shortcut_layers``); see ``inference_call`` for how they are wired."""
        if self.order == "post":
            return super().inference_layers()
        pre = [self.bn_pre, self.activation] if self.order == "pre" else []
        return [layer for layer in pre if layer is not None] + self._encoder_layers()

    def inference_call(self, inputs):
        """This conv in inference mode, from its deployable layers only (no heads, no
        dropout): used by ``LocalModel.inference_model`` to build a functional model."""
        x, skip = self._split(inputs)
        if self.order == "post":
            h = x
            for layer in self._encoder_layers():
                h = layer(h)
            if self.bn is not None:
                h = self.bn(h)
            if self.role == "last":
                h = h + self._shortcut_inference(skip)
            out = self.activation(h)
        else:
            h = x
            for layer in self.inference_layers():
                h = layer(h)
            out = h + self._shortcut_inference(skip) if self.role == "last" else h
        return (out, skip) if self.role in ("first", "middle") else out

    def _shortcut_inference(self, skip):
        for layer in self._shortcut_layers():
            skip = layer(skip)
        return skip

    def build(self, input_shape):
        if self.role in ("middle", "last"):
            shape, skip_shape = (tuple(s) for s in input_shape)
        else:
            shape = skip_shape = tuple(input_shape)
        if self.bn_pre is not None:
            self.bn_pre.build(shape)
        for layer in self._encoder_layers():
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        if self.bn is not None:
            self.bn.build(shape)
        for layer in (self.dropout, self.output_dropout):
            if layer is not None:
                layer.build(shape)
        if self.shortcut is not None:
            self.shortcut.build(skip_shape)
            if tuple(self.shortcut.compute_output_shape(skip_shape)) != shape:
                raise ValueError(f"{self.name}: shortcut output {skip_shape} -> "
                                 f"{self.shortcut.compute_output_shape(skip_shape)} does not "
                                 f"match the conv output {shape}")
        elif self.role == "last" and skip_shape != shape:
            raise ValueError(f"{self.name}: identity shortcut of shape {skip_shape} cannot be "
                             f"added to the conv output {shape}; use a conv shortcut")
        if self.projection is not None:
            self.projection.build((None, self.num_classes))
        for head in self.heads.values():
            head.build(shape)
        self.build_metrics()

    def compute_output_shape(self, input_shape):
        x_shape, skip_shape = (
            (tuple(input_shape[0]), tuple(input_shape[1])) if self.role in ("middle", "last")
            else (tuple(input_shape), tuple(input_shape)))
        shape = x_shape
        for layer in self._encoder_layers():
            shape = tuple(layer.compute_output_shape(shape))
        return (shape, skip_shape) if self.role in ("first", "middle") else shape

    # ------------------------------------------------------------------- training
    def call(self, inputs, training=None, labels=None):
        x, skip = self._split(inputs)
        shortcut = None
        if self.role == "last":
            shortcut = skip
            if self.shortcut is not None:
                shortcut = self.shortcut.encoder(
                    self.shortcut.encoder_padding(skip) if self.shortcut.encoder_padding
                    is not None else skip)
                if self.shortcut.bn is not None:
                    shortcut = self.shortcut.bn(shortcut, training=training)
        if self.order == "post":
            h = x
            for layer in self._encoder_layers():
                h = layer(h)
            if self.bn is not None:
                h = self.bn(h, training=training)
            if shortcut is not None:
                h = h + shortcut
            h = self.activation(h)  # what the heads read
            out = self.dropout(h, training=training) if self.dropout is not None else h
        else:
            h = x
            if self.order == "pre":
                if self.bn_pre is not None:
                    h = self.bn_pre(h, training=training)
                h = self.activation(h)
                if self.dropout is not None:
                    h = self.dropout(h, training=training)
            for layer in self._encoder_layers():
                h = layer(h)
            out = h + shortcut if shortcut is not None else h
            h = None
            if labels is not None and self.has_heads:
                h = self.bn(out, training=training) if self.bn is not None else out
                h = self.activation(h)
        if labels is not None and self.has_heads:
            self.add_loss(self.local_loss(x, h, labels))
        if self.output_dropout is not None:
            out = self.output_dropout(out, training=training)
        return (out, skip) if self.role in ("first", "middle") else out

    def features(self, inputs, training=None):
        raise NotImplementedError("ResidualConv computes its head input inside call()")

    def get_config(self):
        config = super().get_config()
        config.pop("kind")
        return {
            **config, "role": self.role, "order": self.order, "shortcut": self.shortcut_kind,
            "shortcut_strides": self.shortcut_strides, "shortcut_bias": self.shortcut_bias,
            "output_dropout": self.output_dropout_rate,
        }
