"""User plugins: modules that register local losses, architectures or datasets.

``train.py --plugin MODULE`` (repeatable) imports each one before the command line is
parsed, so that the names they register are valid choices; the run's config.json keeps
them, so ``--resume`` imports them again. A plugin is a dotted module name on the Python
path or the path of a ``.py`` file.
"""

import importlib
import importlib.util
import os
import sys


class PluginError(ValueError):
    """A plugin that cannot be imported."""


def load_plugins(names):
    """Import every plugin of ``names``; PluginError (one line) when one fails."""
    for name in names:
        try:
            if name.endswith(".py"):
                _import_file(name)
            else:
                importlib.import_module(name)
        except PluginError:
            raise
        except Exception as error:  # any failure inside user code: report it in one line
            raise PluginError(f"cannot import plugin {name!r}: {type(error).__name__}: "
                              f"{error}") from None


def _import_file(path):
    if not os.path.isfile(path):
        raise PluginError(f"plugin file {path!r} does not exist")
    module_name = "keras_local_plugin_" + os.path.splitext(os.path.basename(path))[0]
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
