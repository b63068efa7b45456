"""Local modules: K groups of consecutive local layers, heads only on each group's last.

The paper trains every layer as its own module (its own heads and loss). Grouping the
local layers into K modules removes the heads of every layer but the last of each
module; the update rule (``keras_local.steps.rule.plan``) then ends a segment only at
layers that keep heads, so gradients flow inside a module and never between modules.
K = 1 is end-to-end training of all hidden layers with one auxiliary head.
"""


def module_sizes(num_layers, modules):
    """Sizes of ``modules`` groups of ``num_layers`` consecutive layers, as equal as
    possible (the first ``num_layers % modules`` groups one layer larger)."""
    if not 1 <= modules <= num_layers:
        raise ValueError(f"modules must be between 1 and the number of local layers "
                         f"({num_layers}), got {modules}")
    base, extra = divmod(num_layers, modules)
    return [base + (1 if i < extra else 0) for i in range(modules)]


def group_into_modules(layers, modules):
    """``layers`` with the local layers grouped into ``modules`` modules: every local
    layer that is not the last of its module is rebuilt without heads (same config,
    ``local_loss=None``). ``modules`` None (or layers without heads, as in backprop
    mode) returns ``layers`` unchanged."""
    from keras_local.layers.block import LocalBlock

    local = [i for i, layer in enumerate(layers)
             if isinstance(layer, LocalBlock) and layer.has_heads]
    if modules is None or not local:
        return list(layers)
    keep, end = set(), 0
    for size in module_sizes(len(local), modules):
        end += size
        keep.add(local[end - 1])
    result = list(layers)
    for i in local:
        if i not in keep:
            block = layers[i]
            result[i] = type(block).from_config({**block.get_config(), "local_loss": None})
    return result
