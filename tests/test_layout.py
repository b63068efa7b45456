"""The package's shape: backend-specific code only behind the kernels seam and in the
executors, few modules at the top, and no import circle between the data modules."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "keras_local")
PORTABLE = ["layers", "losses", "optimizers.py"]


def python_files(*parts):
    path = os.path.join(PACKAGE, *parts)
    if path.endswith(".py"):
        return [path]
    return [os.path.join(folder, name) for folder, _, names in os.walk(path)
            for name in names if name.endswith(".py")]


def imported_modules(path):
    with open(path) as stream:
        tree = ast.parse(stream.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("part", PORTABLE)
def test_portable_code_imports_no_backend_and_tests_for_none(part):
    for path in python_files(part):
        with open(path) as stream:
            source = stream.read()
        assert not [m for m in imported_modules(path)
                    if m.split(".")[0] in ("tensorflow", "jax", "torch")
                    or m.startswith("keras_local.kernels.tensorflow")], path
        assert 'backend() == "tensorflow"' not in source, path
        assert 'backend() != "tensorflow"' not in source, path


def test_at_most_eight_modules_at_the_top():
    modules = [name for name in os.listdir(PACKAGE) if name.endswith(".py")]
    assert len(modules) <= 8, sorted(modules)


def test_the_data_modules_do_not_import_each_other_in_a_circle():
    imports = {name[:-3]: {m.rsplit(".", 1)[-1] for m in imported_modules(
        os.path.join(PACKAGE, "data", name)) if m.startswith("keras_local.data.")}
        for name in os.listdir(os.path.join(PACKAGE, "data")) if name.endswith(".py")}
    for module, targets in imports.items():
        for target in targets:
            assert module not in imports.get(target, set()), (module, target)
