"""The op registry (curvgraph.ops): duplicates refused in both tables, op outputs, layering."""

import ast
import pathlib

import pytest
import torch

import curvgraph
from curvgraph.ops import (
    OutputOf,
    alias_tensor_methods,
    aliases_of,
    lookup_decomposition,
    op_name,
    register_decomposition,
    unregister_decomposition,
)
from curvgraph.rules import ElementwiseRule, lookup_rule, register_rule, unregister

PACKAGE = pathlib.Path(curvgraph.__file__).parent


def _square(input):
    return input**2


def _rule():
    return ElementwiseRule("square", _square, lambda x: 2 * x, lambda x: 2 + 0 * x)


def test_rule_table_refuses_duplicates_unless_override():
    first, second = _rule(), _rule()
    register_rule(_square)(first)
    try:
        with pytest.raises(ValueError, match="already have a rule"):
            register_rule(_square)(second)
        assert lookup_rule(_square) is first
        register_rule(_square, override=True)(second)
        assert lookup_rule(_square) is second
    finally:
        unregister(_square)
    assert lookup_rule(_square) is None


def test_decomposition_table_refuses_duplicates_unless_override():
    def one(call, input):
        return input

    def other(call, input):
        return input

    register_decomposition(_square)(one)
    try:
        with pytest.raises(ValueError, match="already have a decomposition"):
            register_decomposition(_square)(other)
        assert lookup_decomposition(_square) is one
        register_decomposition(_square, override=True)(other)
        assert lookup_decomposition(_square) is other
    finally:
        unregister_decomposition(_square)
    assert lookup_decomposition(_square) is None


def test_builtin_decompositions_are_registered_once():
    assert lookup_decomposition(torch.sort) is not None
    with pytest.raises(ValueError, match="torch.sort"):
        register_decomposition(torch.sort)(lambda call, input: input)


def test_output_of_is_an_op_key_served_by_the_rule_of_every_output():
    first = OutputOf(torch.chunk, "call_function", 1)
    assert first == OutputOf(torch.chunk, "call_function", 1)
    assert first != OutputOf(torch.chunk, "call_function", 0)
    assert op_name(OutputOf(torch.var_mean, "call_function", 1)) == "torch.var_mean[1]"
    assert op_name(OutputOf.every("chunk")) == "Tensor.chunk[*]"
    rule = lookup_rule(first)
    assert rule is not None and rule is lookup_rule(OutputOf(torch.chunk, "call_function", 1))
    x = torch.randn(3, 4)
    assert torch.equal(first(x, 2, 1), torch.chunk(x, 2, 1)[1])
    assert lookup_rule(OutputOf(torch.var_mean, "call_function", 0)) is None


def test_tensor_method_aliases():
    alias_tensor_methods("sinc")
    assert {torch.sinc, "sinc", "sinc_"} <= aliases_of("sinc")


def _curvgraph_imports(path: pathlib.Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] == "curvgraph"}


def test_layers_import_downwards_only():
    for path in (PACKAGE / "ops").rglob("*.py"):
        outside = {n for n in _curvgraph_imports(path) if not n.startswith("curvgraph.ops")}
        assert outside <= {"curvgraph.errors"}, (path, outside)
    for path in (PACKAGE / "rules").rglob("*.py"):
        assert not any(n.startswith("curvgraph.tracing") for n in _curvgraph_imports(path)), path


def test_no_imports_inside_functions():
    for folder in ("ops", "rules", "tracing"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = [
                        n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                    ]
                    assert not inner, (path, node.name)
