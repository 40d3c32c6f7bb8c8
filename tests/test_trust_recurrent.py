"""Recurrent modules (and other leaf modules returning tuples) under the autograd fallback.

``out, _ = self.rnn(x)`` traces to a ``call_module`` node returning a tuple; under
``fallback=True`` capture splits it into one node per output used, and every method gives
the torch.func reference blocks (``tests/reference.py``) or refuses at trace time with the
node, the op and the reason: never a bare ``KeyError`` or a wrong claim that samples mix.
Also: every capture pass leaves a graph that ``torch.fx`` lints as valid.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from tests.reference import ggn_blocks, hessian_blocks

DTYPE = torch.float64
RECURRENT = [nn.RNN, nn.LSTM, nn.GRU]


class LastStep(nn.Module):
    """``out, _ = rnn(x); fc(out[:, -1])`` (batch first)."""

    def __init__(self, cls, batch_first=True, layers=1):
        super().__init__()
        self.rnn = cls(3, 4, num_layers=layers, batch_first=batch_first)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class Indexed(nn.Module):
    """``rnn(x)[0]``, mean over time."""

    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0].mean(1))


class FinalState(nn.Module):
    """The final hidden state ``h_n`` (batch on dimension 1)."""

    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(self.rnn, nn.LSTM) else state
        return self.fc(h[-1])


class WithState(nn.Module):
    """An initial hidden state computed in the forward (batch on dimension 1)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.h0 = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h0 = torch.tanh(self.h0(x[:, 0])).unsqueeze(0)
        out, _ = self.rnn(x, h0)
        return self.fc(out[:, -1])


def _trace(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvgraph.trace(model, fallback=True)


def _data(n):
    torch.manual_seed(3)
    return torch.randn(n, 5, 3, dtype=DTYPE), torch.randint(0, 2, (n,))


def _model(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(DTYPE)


def _assert_blocks(curv, reference, diagonal=False):
    assert set(curv) == set(reference)
    for name, expected in reference.items():
        actual = curv[name].to_dense()
        if diagonal:
            actual, expected = actual.diagonal(), expected.diagonal()
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=name)


def _curvature(cg, x, y, method, curvature="ggn"):
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method=method)


@pytest.mark.parametrize("cls", RECURRENT)
@pytest.mark.parametrize("wrapper", [LastStep, Indexed])
def test_capture_splits_the_tuple_into_one_node_per_output(cls, wrapper):
    cg = _trace(_model(wrapper, cls))
    modules = [n for n in cg.graph_module.graph.nodes if n.op == "call_module"]
    assert [n.target for n in modules] == ["rnn_output0", "fc"]
    info = next(i for i in cg.infos.values() if i.node.target == "rnn_output0")
    assert info.op == f"torch.nn.{cls.__name__}[0]"
    assert {s.parameter for s in info.sources.values() if s.parameter} == {
        n for n, _ in cg.model.named_parameters() if n.startswith("rnn.")
    }
    x, _ = _data(3)
    cg(x)
    assert not cg.record.contexts["rnn_output0"].mixes_samples  # batch_first keeps them apart


@pytest.mark.parametrize("cls", RECURRENT)
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_exact_equals_torch_func_at_a_batch(cls, curvature):
    model = _model(LastStep, cls)
    x, y = _data(3)
    curv = _curvature(_trace(model), x, y, "exact", curvature)
    reference = (ggn_blocks if curvature == "ggn" else hessian_blocks)(model, x, y, F.cross_entropy)
    _assert_blocks(curv, reference)


@pytest.mark.parametrize("cls", RECURRENT)
@pytest.mark.parametrize("method", ["sqrt", "diag", "kflr"])
def test_factor_methods_at_a_batch(cls, method):
    """``sqrt`` exact, ``diag`` its diagonal; ``kflr`` exact for the fallback's parameters."""
    model = _model(Indexed, cls)
    x, y = _data(3)
    curv = _curvature(_trace(model), x, y, method)
    reference = ggn_blocks(model, x, y, F.cross_entropy)
    if method == "kflr":  # fc.weight is Kronecker-factored: exact at one sample only
        assert isinstance(curv["fc.weight"], curvgraph.KroneckerBlock)
        reference = {n: b for n, b in reference.items() if n.startswith("rnn.")}
        curv = {n: curv[n] for n in reference}
        assert all(isinstance(b, curvgraph.LowRankBlock) for b in curv.values())
    _assert_blocks(curv, reference, diagonal=method == "diag")


@pytest.mark.parametrize("cls", RECURRENT)
@pytest.mark.parametrize("method", ["hbp", "kflr", "kfra", "exact", "sqrt"])
def test_blocks_at_one_sample_equal_the_ggn(cls, method):
    model = _model(LastStep, cls)
    x, y = _data(1)
    _assert_blocks(
        _curvature(_trace(model), x, y, method), ggn_blocks(model, x, y, F.cross_entropy)
    )


@pytest.mark.parametrize("cls", RECURRENT)
def test_hbp_hessian_at_one_sample(cls):
    model = _model(LastStep, cls)
    x, y = _data(1)
    curv = _curvature(_trace(model), x, y, "hbp", "hessian")
    _assert_blocks(curv, hessian_blocks(model, x, y, F.cross_entropy))


@pytest.mark.parametrize("cls", RECURRENT)
def test_kfac_gives_a_symmetric_psd_block_per_parameter(cls):
    model = _model(LastStep, cls)
    x, y = _data(3)
    curv = _curvature(_trace(model), x, y, "kfac")
    assert set(curv) == {n for n, _ in model.named_parameters()}
    for name in curv:
        block = curv[name].to_dense()
        torch.testing.assert_close(block, block.T)
        assert torch.linalg.eigvalsh(block).min() > -1e-10


def test_two_layers_and_hbp_methods_at_a_batch_do_not_crash():
    model = _model(LastStep, nn.LSTM, layers=2)
    x, y = _data(3)
    cg = _trace(model)
    _assert_blocks(_curvature(cg, x, y, "exact"), ggn_blocks(model, x, y, F.cross_entropy))
    for method in ("hbp", "kfra"):
        curv = _curvature(cg, x, y, method)
        assert set(curv) == {n for n, _ in model.named_parameters()}


class Unpacked(nn.Module):
    """``out, (h, c) = lstm(x)`` with ``h``, ``c`` unused."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.fc(out[:, -1])


def test_unused_nested_states_are_dropped():
    model = _model(Unpacked)
    cg = _trace(model)
    assert [n.target for n in cg.graph_module.graph.nodes if n.op == "call_module"] == [
        "rnn_output0",
        "fc",
    ]
    x, y = _data(3)
    _assert_blocks(_curvature(cg, x, y, "sqrt"), ggn_blocks(model, x, y, F.cross_entropy))


@pytest.mark.parametrize("cls", RECURRENT)
def test_batch_first_false_is_refused_at_trace_time(cls):
    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        _trace(_model(LastStep, cls, batch_first=False))
    message = str(raised.value)
    assert "node 'rnn_output0'" in message
    assert f"torch.nn.{cls.__name__}" in message
    assert "batch_first=False" in message and "dimension 1" in message
    assert "out, _ = self.rnn(x)" in message  # the source line


@pytest.mark.parametrize("cls", RECURRENT)
def test_final_hidden_state_is_refused_at_trace_time(cls):
    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        _trace(_model(FinalState, cls))
    message = str(raised.value)
    assert "node 'rnn_output1" in message
    assert "final hidden state" in message and "dimension 1" in message
    assert "_, state = self.rnn(x)" in message


def test_an_initial_state_from_the_forward_is_refused_at_trace_time():
    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        _trace(_model(WithState))
    message = str(raised.value)
    assert "node 'rnn_output0'" in message and "initial hidden state hx" in message


def last_of_first(pair):
    """A user function of the whole tuple (kept as one node by torch.fx.wrap)."""
    return pair[0][:, -1]


torch.fx.wrap("last_of_first")


def test_a_tuple_used_whole_is_refused_at_trace_time():
    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 4, batch_first=True)

        def forward(self, x):
            return last_of_first(self.rnn(x)).sum(1)

    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        _trace(_model(Whole))
    message = str(raised.value)
    assert "node 'rnn'" in message and "returns a tuple (output, h_n)" in message


def test_nested_parameters_of_a_leaf_module_get_identifier_slots():
    """The split module's parameters sit in a submodule (``module.weight_ih_l0``)."""
    cg = _trace(_model(LastStep, nn.GRU))
    info = next(i for i in cg.infos.values() if i.node.target == "rnn_output0")
    assert info.sources["module__weight_ih_l0"].parameter == "rnn.weight_ih_l0"
    assert all(slot.isidentifier() for slot in info.rule.signature.parameters)


# -- every capture pass leaves a valid graph ------------------------------------------------------


class Chunks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=1)
        c, d = torch.split(a * b, [1, 2], dim=1)
        return c + d.sum(1, keepdim=True)


class Max(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).max(dim=1).values.unsqueeze(1) * x


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0].sum(1)


@pytest.mark.parametrize(
    "build, fallback",
    [
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), False),
        (Chunks, False),
        (Max, False),
        (Attention, False),
        (lambda: LastStep(nn.LSTM), True),
        (Unpacked, True),
        (lambda: FinalState(nn.LSTM), False),  # without the fallback: nothing split
    ],
)
def test_every_capture_pass_leaves_a_valid_graph(build, fallback):
    from curvgraph.graph.traced import capture

    torch.manual_seed(0)
    model = build()
    graph_module = capture(model, fallback)
    graph_module.graph.lint()
    x = torch.randn(2, 4)
    if isinstance(model, Attention):
        x = torch.randn(2, 5, 4)
    if hasattr(model, "rnn"):
        x = torch.randn(2, 5, 3)
    torch.testing.assert_close(graph_module(x), model(x))
    if fallback:
        _trace(model).graph_module.graph.lint()
