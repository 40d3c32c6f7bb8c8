"""Dict and tuple inputs under symbolic tracing (issue 14).

``torch.fx`` gives each input of ``forward`` one traced value, as if it were a tensor. A model
taking a dict or a tuple used to be refused at the indexing (``getitem`` "has no usable
rule", with advice to register a rule) or, when it iterated the input, for "Python control
flow". Now the refusal names the input, how it was used and where, and says what to do:
pass an example batch (``torch.export`` captures containers) or use the fallback. With an
example batch ``capture="auto"`` captures such models, with the exact rules: checked here
against torch.func in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import curvgraph
from curvgraph.errors import SymbolicTraceError

DTYPE = torch.float64


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch):
        return torch.tanh(self.fc(batch["x"])) * batch["weight"]


class TupleInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, pair):
        x, weight = pair
        return torch.tanh(self.fc(x)) * weight


class IteratedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch):
        return sum(torch.tanh(self.fc(v)) for _, v in batch.items())


def _batch(cls):
    torch.manual_seed(1)
    x, weight = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, 3, dtype=DTYPE)
    if cls is TupleInput:
        return (x, weight)
    if cls is IteratedInput:
        return {"a": x, "b": x.flip(0)}
    return {"x": x, "weight": weight}


CASES = [
    (DictInput, "'batch' is a dict", "batch['x']", 'batch["x"]'),
    (TupleInput, "'pair' is a tuple or list", "pair[0]", "x, weight = pair"),
    (IteratedInput, "'batch' is a dict", "batch.items()", "batch.items()"),
]


@pytest.mark.parametrize("capture", ["fx", "auto"])
@pytest.mark.parametrize("cls, kind, use, line", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_container_input_is_named_with_what_to_do(capture, cls, kind, use, line):
    with pytest.raises(SymbolicTraceError) as caught:
        curvgraph.trace(cls(), capture=capture)  # no example batch
    message = str(caught.value)
    assert message.startswith(f"torch.fx could not trace {cls.__name__}: its input {kind} ")
    assert f"(used as {use} at " in message
    assert __file__ in message and line in message  # the user's source line
    assert "curvgraph.trace(model, batch)" in message and "capture='export'" in message
    assert "has no usable rule" not in message and "control flow" not in message
    if cls is not IteratedInput:  # the fallback serves indexing, not iteration
        assert "fallback=True" in message


def _ggn_reference(model, batch):
    """``J^T J`` per parameter for the loss ``1/2 sum(out^2)`` (torch.func, float64)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (batch,)))(params)
    return {n: (lambda j: j.T @ j)(jac[n].reshape(-1, params[n].numel())) for n in params}


@pytest.mark.parametrize("cls", [DictInput, TupleInput, IteratedInput])
def test_with_an_example_batch_auto_captures_it_exactly(cls):
    torch.manual_seed(0)
    model = cls().to(DTYPE)
    batch = _batch(cls)
    cg = curvgraph.trace(model, batch)  # capture="auto": fx refuses, torch.export captures
    out = cg(batch)
    torch.testing.assert_close(out, model(batch), rtol=0, atol=0)
    loss = 0.5 * out.pow(2).sum()
    curv = cg.curvature(loss, out, curvature="ggn", method="exact")
    expected = _ggn_reference(model, batch)
    assert set(curv) == set(expected) == {"fc.weight", "fc.bias"}
    for name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), expected[name], rtol=1e-10, atol=1e-12)


def test_a_tensor_input_indexed_along_features_is_not_a_container():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x[:, :2]) * x[:, 2:3]

    torch.manual_seed(0)
    model = Features().to(DTYPE)
    cg = curvgraph.trace(model, capture="fx")
    x = torch.randn(5, 3, dtype=DTYPE)
    torch.testing.assert_close(cg(x), model(x), rtol=0, atol=0)
