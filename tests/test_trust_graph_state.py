"""Issue 14: results that were silently wrong, now right or refused with a reason.

1. State changed after ``trace``: a parameter replaced or a submodule swapped after the
   trace. Every call of the graph traces the model again (same ``fallback``), so the
   curvature is that of the changed model (compared with torch.func in float64); a change
   between ``cg(x)`` and the curvature call is refused.
2. Blocks silently missing: parameters cut off from the output by an op without a
   derivative (``torch.sign``, a comparison, ``one_hot``) are named, with the node that cuts
   them off, in a warning (once per graph), by ``curvgraph.inspect`` and in the error when
   no parameter is left. A layer *after* such an op keeps its block (it used to lose it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError

try:
    from reference import ggn_blocks, hessian_blocks
except ImportError:  # run from the repository root as a package
    from tests.reference import ggn_blocks, hessian_blocks

DTYPE = torch.float64


def _data(features=4, classes=2, n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, dtype=DTYPE, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def _assert_matches(curvature, expected, atol=1e-10):
    assert sorted(curvature) == sorted(expected)
    for name, block in expected.items():
        torch.testing.assert_close(curvature[name].to_dense(), block, rtol=1e-9, atol=atol)


# -- 1. state changed after trace ----------------------------------------------------------------
class DirectWeight(nn.Module):
    """A parameter used directly (``F.linear(x, self.w)``) and a linear submodule."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))
        self.fc = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.fc(torch.tanh(F.linear(x, self.w)))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_a_parameter_replaced_after_trace_is_used(curvature):
    torch.manual_seed(0)
    model = DirectWeight()
    cg = curvgraph.trace(model)
    x, y = _data()
    old = model.w
    model.w = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))
    out = cg(x)
    torch.testing.assert_close(out, model(x))  # the graph runs the new tensor
    loss = F.cross_entropy(out, y)
    result = cg.curvature(loss, out, curvature=curvature, method="exact")
    reference = (ggn_blocks if curvature == "ggn" else hessian_blocks)(model, x, y, F.cross_entropy)
    _assert_matches(result, reference)
    loss.backward()  # gradients go to the new parameter, not the old one
    assert model.w.grad is not None and old.grad is None


def test_a_swapped_submodule_is_used():
    torch.manual_seed(0)
    model = DirectWeight()
    cg = curvgraph.trace(model)
    x, y = _data()
    model.fc = nn.Linear(3, 2).double()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    result = cg.curvature(loss, out, method="hbp")  # batch-averaged: compare blocks at N = 1
    assert sorted(result) == ["fc.bias", "fc.weight", "w"]
    out = cg(x[:1])
    loss = F.cross_entropy(out, y[:1])
    result = cg.curvature(loss, out, curvature="hessian", method="hbp")
    _assert_matches(result, hessian_blocks(model, x[:1], y[:1], F.cross_entropy))


def test_a_swapped_sequential_entry_is_used_and_keeps_the_fallback_setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    cg = curvgraph.trace(model, fallback=True)
    x, y = _data()
    model[0] = nn.Linear(4, 3).double()  # a layer with parameters
    model[1] = nn.Sigmoid()  # and one without: only its identity tells
    out = cg(x)
    assert cg.fallback is True
    assert cg.graph_module.get_submodule("1") is model[1]
    loss = F.cross_entropy(out, y)
    result = cg.curvature(loss, out, curvature="hessian", method="exact")
    _assert_matches(result, hessian_blocks(model, x, y, F.cross_entropy))


def test_nothing_is_traced_again_without_a_replacement():
    torch.manual_seed(0)
    model = DirectWeight()
    cg = curvgraph.trace(model)
    graph_module = cg.graph_module
    x, _ = _data()
    cg(x)
    with torch.no_grad():  # in-place changes are seen by the graph: no new trace needed
        model.w.add_(1.0)
        model.fc.weight.data = torch.zeros(2, 3, dtype=DTYPE)
    assert cg.changes() == []
    cg(x)
    assert cg.graph_module is graph_module


def test_a_change_between_the_forward_and_the_curvature_is_refused():
    torch.manual_seed(0)
    model = DirectWeight()
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    model.w = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))
    model.fc = nn.Linear(3, 2).double()
    with pytest.raises(CurvGraphError, match="changed after it was traced") as error:
        cg.curvature(loss, out, method="exact")
    message = str(error.value)
    assert "parameter 'w' replaced" in message and "parameter 'fc.weight' replaced" in message
    assert "cg(x)" in message and "curvgraph.trace(model)" in message


def test_inspect_of_a_traced_graph_sees_the_swapped_submodule():
    torch.manual_seed(0)
    model = DirectWeight()
    cg = curvgraph.trace(model)
    model.fc = nn.Linear(3, 5).double()
    report = cg.to_networkx(_data()[0])
    assert report.nodes["fc"]["output_shape"] == (5, 5)


# -- 2. blocks cut off by an op without a derivative ---------------------------------------------
class Cut(nn.Module):
    """``fc2(cut(fc1(x))) + fc3(x)`` with an op without a derivative in the middle."""

    def __init__(self, cut):
        super().__init__()
        self.fc1 = nn.Linear(4, 3).double()
        self.fc2 = nn.Linear(3, 2).double()
        self.fc3 = nn.Linear(4, 2).double()
        self.cut = cut

    def forward(self, x):
        return self.fc2(self.cut(self.fc1(x))) + self.fc3(x)


CUTS = {
    "sign": (torch.sign, "'sign' (torch.sign)"),
    "comparison": (lambda h: (h > 0).to(h.dtype), "'gt' (_operator.gt)"),
    "one_hot": (lambda h: F.one_hot(h.argmax(-1), 3).to(h.dtype), "'argmax'"),
}


@pytest.mark.parametrize("kind", sorted(CUTS))
def test_parameters_cut_off_are_named_in_a_warning_and_the_rest_is_exact(kind):
    cut, node = CUTS[kind]
    torch.manual_seed(0)
    model = Cut(cut)
    cg = curvgraph.trace(model)
    x, y = _data(seed=1)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    with pytest.warns(UserWarning, match="parameters without a block") as record:
        result = cg.curvature(loss, out, method="exact")
    message = str(next(w.message for w in record if "without a block" in str(w.message)))
    assert "fc1.weight, fc1.bias (cut off by node " + node in message
    assert "test_trust_graph_state.py" in message and "no derivative" in message
    reference = ggn_blocks(model, x, y, F.cross_entropy)
    # fc2 follows the cut: it used to get no block at all; fc1's true block is zero
    for name in ("fc1.weight", "fc1.bias"):
        assert torch.count_nonzero(reference.pop(name)) == 0
    _assert_matches(result, reference)
    with warnings.catch_warnings():  # once per graph
        warnings.simplefilter("error")
        out = cg(x)
        cg.curvature(F.cross_entropy(out, y), out, method="kflr")


def test_inspect_lists_parameters_cut_off_with_the_node():
    torch.manual_seed(0)
    x, _ = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inspect reports, it does not warn
        report = curvgraph.inspect(Cut(torch.sign), x)
    assert sorted(report.cut_off) == ["fc1.bias", "fc1.weight"]
    assert report.cut_off["fc1.weight"].startswith("node 'sign' (torch.sign) at ")
    assert report.cut_off["fc1.weight"].endswith(": no derivative")
    text = str(report)
    assert "parameters without a block: fc1.weight, fc1.bias (cut off by node 'sign'" in text
    assert sorted(report.parameters) == ["fc2.bias", "fc2.weight", "fc3.bias", "fc3.weight"]


class OnlyCut(nn.Module):
    """Every parameter reaches the output through ``torch.sign`` only."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 2).double()

    def forward(self, x):
        return torch.sign(self.fc1(x)) + x[:, :2]


def test_no_parameter_left_names_the_cutting_node():
    torch.manual_seed(0)
    model = OnlyCut()
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    with pytest.raises(CurvGraphError, match="without a derivative") as error:
        cg.curvature(F.cross_entropy(out, y), out)
    message = str(error.value)
    assert "does not depend" not in message
    assert "fc1.weight, fc1.bias (cut off by node 'sign' (torch.sign) at " in message
    report = curvgraph.inspect(model, x)
    assert report.methods["exact"].startswith("no: no trainable parameter gets a curvature block")
    assert "parameters without a block: fc1.weight, fc1.bias" in str(report)


class Threshold(nn.Module):
    """A parameter read only by a comparison: ``x * (x > t)``."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.zeros(4, dtype=DTYPE))
        self.fc = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.fc(x * (x > self.t).to(x.dtype))


def test_a_parameter_read_only_by_a_comparison_is_named():
    torch.manual_seed(0)
    model = Threshold()
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    with pytest.warns(UserWarning, match=r"parameters without a block: t \(cut off by node 'gt'"):
        result = cg.curvature(F.cross_entropy(out, y), out, method="exact")
    _assert_matches(
        result, {k: v for k, v in ggn_blocks(model, x, y, F.cross_entropy).items() if k != "t"}
    )


class DeadHead(nn.Module):
    """A head the output does not use (dead code), and a frozen cut-off layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3).double().requires_grad_(False)
        self.fc = nn.Linear(4, 2).double()
        self.unused_head = nn.Linear(4, 7).double()

    def forward(self, x):
        self.unused_head(x)  # computed, never used
        return self.fc(x) + torch.sign(self.fc1(x)).sum(-1, keepdim=True)


def test_unused_and_frozen_parameters_stay_silent():
    torch.manual_seed(0)
    model = DeadHead()
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cg.curvature(F.cross_entropy(out, y), out, method="exact")
    assert sorted(result) == ["fc.bias", "fc.weight"]
    report = curvgraph.inspect(model, x)
    assert report.unused == ["unused_head.weight", "unused_head.bias"] and not report.cut_off
    assert "parameters the output does not use (no block): unused_head.weight" in str(report)
