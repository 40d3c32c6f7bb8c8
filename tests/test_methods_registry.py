"""Every registered method, checked from the registry against torch.func in float64."""

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks, pch_blocks_sequential
from torch import nn

import curvgraph
from curvgraph.curvature import DiagonalBlock
from curvgraph.graph import plan
from curvgraph.methods import (
    Method,
    Verdict,
    lookup_method,
    register_method,
    registered_methods,
    unregister_method,
)

CASES = [(name, c) for name, m in registered_methods().items() for c in sorted(m.curvatures)]
MODES = {"pch-abs": "abs", "pch-clip": "clip"}


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _reference(model, x, y, curvature):
    if curvature == "ggn":
        return ggn_blocks(model, x, y, F.cross_entropy)
    if curvature == "hessian":
        return hessian_blocks(model, x, y, F.cross_entropy)
    return pch_blocks_sequential(
        list(model.named_children()), x, y, F.cross_entropy, MODES[curvature]
    )


def _relative_error(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("name, curvature", CASES)
def test_one_sample_blocks_equal_the_reference(name, curvature):
    """For one sample every method is exact (Monte-Carlo ones up to their sampling error)."""
    method = lookup_method(name)
    model = _mlp()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    options = {}
    if method.monte_carlo:
        options = {"mc_samples": 20000, "generator": torch.Generator().manual_seed(0)}
    curv = cg.curvature(loss, out, curvature=curvature, method=name, **options)
    reference = _reference(model, x, y, curvature)
    assert sorted(curv) == sorted(reference)
    tolerance = 0.1 if method.monte_carlo else 1e-10
    for parameter, block in curv.items():
        expected = reference[parameter]
        if isinstance(block, DiagonalBlock):
            actual, expected = block.to_dense().diagonal(), expected.diagonal()
        else:
            actual = block.to_dense()
        assert _relative_error(actual, expected) < tolerance, (name, parameter)


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_check_gives_a_verdict_and_refuses_mixing_for_per_sample_methods(name):
    method = lookup_method(name)
    cg = curvgraph.trace(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    cg(torch.randn(6, 4))
    verdict = method.check(cg, plan(cg))
    assert isinstance(verdict, Verdict)
    assert verdict.ok is not method.per_sample
    assert str(verdict).startswith("yes" if verdict.ok else "no: node(s)")
    cg.eval()
    cg(torch.randn(6, 4))
    assert method.check(cg, plan(cg)).ok


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_a_curvature_it_does_not_compute_is_refused(name):
    method = lookup_method(name)
    cg = curvgraph.trace(_mlp())
    out = cg(torch.randn(3, 4, dtype=torch.float64))
    loss = F.cross_entropy(out, torch.tensor([0, 1, 1]))
    for curvature in {"hessian", "ggn", "pch-abs", "pch-clip"} - method.curvatures:
        with pytest.raises(ValueError, match=name):
            cg.curvature(loss, out, curvature=curvature, method=name)


def test_the_registry_refuses_duplicates_and_unknown_names():
    class Twice(Method):
        name = "twice"

    register_method(Twice)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_method(Twice)
        register_method(Twice, override=True)
        assert isinstance(lookup_method("twice"), Twice)
    finally:
        unregister_method("twice")
    with pytest.raises(ValueError, match="expected one of"):
        lookup_method("twice")
    with pytest.raises(TypeError):
        register_method(object())
