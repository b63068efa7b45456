"""Lazy package attributes (PEP 562): a package names what it exports and from which
module, and a module is imported on first access. Importing ``keras_local`` or one of its
registries then starts no backend, so the CLIs can parse their arguments and choose the
Keras backend before Keras is imported."""

import importlib


def lazy_exports(package, exports):
    """``(__getattr__, __dir__)`` for ``package`` exporting ``{name: module}``."""

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
