"""The house reads top-down: each layer imports only the layers below it.

    utils/  (leaves)  <  refer/  <  data/, models/  <  engine/  <  programs, bench/, tools/

No module edits sys.path: the repository is installed as a package (pyproject.toml).
"""
import ast
import os

import pytest

from utils.paths import REPO_ROOT

PACKAGES = ("utils", "refer", "data", "models", "engine", "bench")
# What each package may import from the project (besides itself).
ALLOWED = {
    "utils": set(),
    "refer": {"utils"},
    "data": {"utils", "refer"},
    "models": {"utils"},
    "engine": {"utils", "refer", "data", "models"},
    "bench": {"utils", "refer", "data", "models", "engine"},
}


def python_files(folder):
    for directory, _, names in os.walk(os.path.join(REPO_ROOT, folder)):
        for name in names:
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def project_imports(path):
    """Top-level project packages a module imports (absolute imports only; relative imports stay
    inside the package)."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below(package):
    for path in python_files(package):
        imported = project_imports(path) - {package}
        assert imported <= ALLOWED[package], f"{os.path.relpath(path, REPO_ROOT)} imports {sorted(imported - ALLOWED[package])}"


def test_no_module_edits_sys_path():
    folders = PACKAGES + ("tests", "tools")
    paths = [p for folder in folders for p in python_files(folder)]
    paths += [os.path.join(REPO_ROOT, name) for name in os.listdir(REPO_ROOT) if name.endswith(".py")]
    for path in paths:
        with open(path) as handle:
            tree = ast.parse(handle.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "path" and \
                    isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
                raise AssertionError(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno} edits sys.path")


def test_the_training_program_and_engine_have_short_functions():
    """train.py is parse, build, Trainer(...).fit(); the loop's steps and hooks are methods a
    reader takes in at once (engine/trainer.py, engine/hooks.py): none over 60 lines."""
    paths = [os.path.join(REPO_ROOT, "train.py"), *python_files("engine")]
    long = []
    for path in paths:
        with open(path) as handle:
            tree = ast.parse(handle.read(), filename=path)
        long += [f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno} {node.name} "
                 f"({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
