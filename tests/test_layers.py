"""The package's layers: imports go only downward, and none hide inside functions."""

import ast
import pathlib
import shutil
import subprocess

import pytest

import curvgraph

PACKAGE = pathlib.Path(curvgraph.__file__).parent


def _function_imports(path: pathlib.Path):
    """``(line, module)`` of curvgraph imports inside function bodies of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curvgraph"):
                yield node.lineno, node.module
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("curvgraph"):
                        yield node.lineno, alias.name


def test_no_curvgraph_import_is_hidden_inside_a_function():
    found = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, module in _function_imports(path)
    ]
    assert not found, "imports inside functions (a cycle dodged?):\n" + "\n".join(found)


def test_the_function_import_finder_finds_one(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from curvgraph.methods import hbp\n    return hbp\n")
    assert list(_function_imports(module)) == [(2, "curvgraph.methods")]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_the_layer_contract_holds():
    root = PACKAGE.parent
    result = subprocess.run(["lint-imports"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
