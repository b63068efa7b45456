"""Training steps: the update rule (``rule.py``), written once, and one executor per backend.

``step_functions(backend, pipelined)`` is the small registry that LocalModel asks for the
``train_step`` / ``test_step`` of the backend Keras runs on; executor modules are imported
only when used, so a machine without JAX or torch never imports them.
"""

import importlib

EXECUTORS = {
    "tensorflow": "keras_local.steps.tensorflow",
    "jax": "keras_local.steps.jax",
    "torch": "keras_local.steps.torch",
    "pipeline": "keras_local.steps.pipeline",  # TensorFlow, layer-parallel
}


def register_executor(name, module_name):
    """Register a module defining ``train_step`` (and ``test_step``) under ``name``."""
    EXECUTORS[name] = module_name


def step_functions(backend, pipelined=False):
    """The executor module for ``backend`` (the pipelined one for a pipelined TF model)."""
    name = "pipeline" if pipelined and backend == "tensorflow" else backend
    if name not in EXECUTORS:
        raise ValueError(f"LocalModel trains on the {', '.join(n for n in EXECUTORS if n != 'pipeline')} "
                         f"backends; got {backend!r}")
    return importlib.import_module(EXECUTORS[name])
