"""What every architecture family shares: block seeds, block options from the Config,
and the fully connected local blocks that end every network. Keras is imported inside
the functions (see ``keras_local.models``)."""

SEED_STRIDE = 100  # distance between the seeds of consecutive blocks (LocalBlock.part_seed)


def block_seed(config, index):
    return (config.seed * 1000 + index) * SEED_STRIDE


def block_kwargs(config, num_classes):
    return dict(
        num_classes=num_classes,
        batch_norm=config.batch_norm,
        nonlin=config.nonlin,
        dropout=config.dropout,
        local_loss=None if config.backprop else config.loss_sup,
        beta=config.beta,
        dim_in_decoder=config.dim_in_decoder,
        bio=config.bio,
        target_proj_size=config.target_proj_size,
        unsup_loss=None if config.loss_unsup == "none" else f"unsup_{config.loss_unsup}",
        alpha=config.alpha,
        similarity_std=config.similarity_std,
        dtype=config.precision,
    )


def dense_blocks(config, num_classes, first_index):
    """``num_layers`` Dense local blocks of ``num_hidden`` units, named from ``first_index``."""
    from keras_local.layers.block import LocalBlock

    return [
        LocalBlock("dense", config.num_hidden, seed=block_seed(config, first_index + i),
                   name=f"block_{first_index + i}", first_layer=first_index + i == 1,
                   **block_kwargs(config, num_classes))
        for i in range(config.num_layers)
    ]
