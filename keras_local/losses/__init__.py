"""The local losses: ``maths`` (the similarity matrix and the loss functions, in keras.ops)
and ``registry`` (the named local losses a block can train on, importable before a
backend is chosen)."""
