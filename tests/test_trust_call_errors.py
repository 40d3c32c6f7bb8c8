"""Crashes and misleading errors of a call (issue 14): each works, or names its cause.

Keyword arguments of the model's forward, a forward under ``torch.no_grad()``, tuple and
dict outputs, exceptions raised by the model's own forward while traced (not control flow),
dict inputs and an empty batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.rules import elementwise_rule, unregister


class Scaled(nn.Module):
    """A forward with a keyword argument with a default and a keyword-only one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x, scale=1.0, *, shift=0.0):
        return self.fc2(torch.tanh(self.fc1(x))) * scale + shift


class Variadic(nn.Module):
    """``*args`` and ``**kwargs`` (fx indexes them, it cannot iterate them)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, *extra, **options):
        return self.fc(x) * options["gain"] + extra[0]


def _dense(curvature):
    return {name: curvature[name].to_dense() for name in curvature}


def test_keyword_arguments_are_bound_like_the_models_forward():
    torch.manual_seed(0)
    model = Scaled().double()
    cg = curvgraph.trace(model)
    x, shift = torch.randn(5, 4).double(), torch.randn(2).double()
    calls = [
        ((x,), {}),
        ((x,), {"scale": 2.0}),
        ((x, 2.0), {}),
        ((), {"x": x, "scale": 3.0, "shift": shift}),
        ((x,), {"shift": shift}),
    ]
    for args, kwargs in calls:
        assert torch.equal(cg(*args, **kwargs), model(*args, **kwargs)), (args, kwargs)
    model = Variadic().double()
    with warnings.catch_warnings():  # indexing the containers: the fallback (see dict inputs)
        warnings.simplefilter("ignore")
        cg = curvgraph.trace(model, fallback=True)
    extra = torch.randn(5, 2).double()
    for args, kwargs in [((x, extra), {"gain": 3.0}), ((x, extra, x), {"gain": 0.5, "b": 1})]:
        assert torch.equal(cg(*args, **kwargs), model(*args, **kwargs)), (args, kwargs)


def test_curvature_of_a_call_with_keywords_is_that_of_the_call():
    """``out = scale * f(x)``, loss ``sum(out^2)``: the GGN of ``scale=2`` is 4 times that of 1."""
    torch.manual_seed(0)
    model = Scaled().double()
    cg = curvgraph.trace(model)
    x = torch.randn(5, 4).double()
    blocks = {}
    for scale in (1.0, 2.0):
        out = cg(x, scale=scale)
        assert torch.equal(out, model(x, scale=scale))
        blocks[scale] = _dense(cg.curvature(out.pow(2).sum(), out, method="exact"))
    out = cg(x, 2.0)  # positional: the same curvature
    positional = _dense(cg.curvature(out.pow(2).sum(), out, method="exact"))
    assert set(blocks[1.0]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for name, block in blocks[1.0].items():
        assert torch.allclose(blocks[2.0][name], 4 * block, atol=1e-10), name
        assert torch.allclose(positional[name], blocks[2.0][name], atol=1e-12), name


def test_a_call_that_does_not_fit_the_forward_names_it():
    model = Scaled()
    cg = curvgraph.trace(model)
    x = torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"Scaled\.forward\(\) multiple values for .*'scale'"):
        cg(x, 2.0, scale=3.0)
    with pytest.raises(TypeError, match=r"Scaled\.forward\(\) missing a required argument: 'x'"):
        cg(scale=2.0)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TypeError, match=r"Plain\.forward\(\) got an unexpected keyword .*'bad'"):
        curvgraph.trace(Plain())(x, bad=1)
    with pytest.raises(TypeError, match=r"Plain\.forward\(\) too many positional"):
        curvgraph.trace(Plain())(x, x)


def test_a_forward_under_no_grad_records_but_refuses_curvature_with_the_cause():
    torch.manual_seed(0)
    model = Scaled()
    cg = curvgraph.trace(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        out = cg(x)
    assert torch.equal(out, model(x)) and out.grad_fn is None
    assert not cg.record.grad_enabled and cg.record.contexts  # recorded all the same
    loss = out.pow(2).sum()
    with pytest.raises(curvgraph.CurvGraphError, match=r"ran with gradients disabled.*no_grad"):
        cg.record.check_curvature_call("Scaled", loss, out)
    with torch.inference_mode():
        cg(x)
    with pytest.raises(curvgraph.CurvGraphError, match=r"inference_mode"):
        cg.record.check_curvature_call("Scaled", loss, cg.record.result)
    out = cg(x)  # a forward with gradients, a loss without
    assert cg.record.grad_enabled
    with torch.no_grad():
        loss = out.pow(2).sum()
    with pytest.raises(curvgraph.CurvGraphError, match=r"loss is not attached to the outputs"):
        cg.record.check_curvature_call("Scaled", loss, out)
    cg.record.check_curvature_call("Scaled", out.pow(2).sum(), out)  # fine


class TwoOutputs(nn.Module):
    def __init__(self, as_dict):
        super().__init__()
        self.fc, self.as_dict = nn.Linear(4, 3), as_dict

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "hidden": torch.tanh(y)} if self.as_dict else (y, torch.tanh(y))


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_work_and_curvature_names_the_output_type(as_dict):
    torch.manual_seed(0)
    model = TwoOutputs(as_dict)
    cg = curvgraph.trace(model)
    x = torch.randn(5, 4)
    out, expected = cg(x), model(x)
    assert type(out) is type(expected)  # a plain dict, not fx's immutable one
    keys = list(expected) if as_dict else range(2)
    assert all(torch.equal(out[k], expected[k]) for k in keys)
    logits = out["logits"] if as_dict else out[0]
    described = "a dict with keys ['logits', 'hidden']" if as_dict else "a tuple of 2 values"
    with pytest.raises(curvgraph.CurvGraphError) as caught:
        cg.record.check_curvature_call("TwoOutputs", logits.sum(), logits)
    message = str(caught.value)
    assert f"TwoOutputs returns {described}" in message
    assert "single tensor" in message and "wrapper" in message

    class Wrapped(nn.Module):  # what the message advises
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["logits"] if as_dict else self.model(x)[0]

    wrapped = curvgraph.trace(Wrapped())
    out = wrapped(x)
    assert torch.equal(out, logits)
    curvature = wrapped.curvature(out.pow(2).sum(), out, method="exact")
    assert set(curvature) == {"model.fc.weight", "model.fc.bias"}


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(x)  # a bug: there is no fc2


class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("unsupported configuration")


def test_an_exception_of_the_forward_is_reported_as_what_it_is():
    with pytest.raises(curvgraph.TraceError) as caught:
        curvgraph.trace(Broken())
    message = str(caught.value)
    assert message.startswith("tracing Broken failed: AttributeError: ")
    assert "'Broken' object has no attribute 'fc2'" in message
    assert "test_trust_call_errors.py" in message and "return self.fc2(x)" in message
    assert "control flow" not in message and "register_rule" not in message
    assert isinstance(caught.value.__cause__, AttributeError)
    with pytest.raises(curvgraph.TraceError) as caught:
        curvgraph.trace(Raises())
    message = str(caught.value)
    assert "tracing Raises failed: ValueError: unsupported configuration at " in message
    assert "control flow" not in message
    assert isinstance(caught.value.__cause__, ValueError)


class If(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Len(nn.Module):
    def forward(self, x):
        return x * len(x)


class Range(nn.Module):
    def forward(self, x):
        for _ in range(x.shape[0]):
            x = x + 1
        return x


class Unpack(nn.Module):
    def forward(self, x):
        return sum(x)  # iterates a traced value


@pytest.mark.parametrize("cls", [If, Len, Range, Unpack])
def test_control_flow_on_traced_values_keeps_its_advice(cls):
    with pytest.raises(curvgraph.TraceError) as caught:
        curvgraph.trace(cls())
    message = str(caught.value)
    assert message.startswith(f"torch.fx could not trace {cls.__name__}: ")
    assert "control flow" in message and "register_rule" in message
    assert "test_trust_call_errors.py" in message  # the line that used the traced value


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch):
        return self.fc(batch["x"]) * batch["weight"]


def test_a_dict_input_is_refused_at_its_key_or_served_by_the_fallback():
    # the input is named, with its use and line (tests/test_trust_inputs_fx.py has more)
    with pytest.raises(
        curvgraph.TraceError,
        match=r"(?s)input 'batch' is a dict \(used as batch\['x'\].*batch\[\"x\"\]",
    ):
        curvgraph.trace(DictInput())
    torch.manual_seed(0)
    model = DictInput()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = curvgraph.trace(model, fallback=True)
    batch = {"x": torch.randn(5, 4), "weight": torch.randn(5, 3)}
    out = cg(batch)
    assert torch.equal(out, model(batch))
    out = cg(batch=batch)  # by keyword too
    assert torch.equal(out, model(batch))
    assert set(cg.curvature(out.pow(2).sum(), out, method="exact")) == {"fc.weight", "fc.bias"}


def test_an_empty_batch_runs_like_the_model_and_refuses_curvature_early():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    cg = curvgraph.trace(model)
    x = torch.randn(0, 4)
    out = cg(x)  # the first call's rule check has nothing to compare: no crash
    assert out.shape == (0, 2) and torch.equal(out, model(x))
    loss = torch.nn.functional.mse_loss(out, torch.zeros(0, 2), reduction="sum")
    with pytest.raises(curvgraph.CurvGraphError, match=r"the batch is empty: .*\(0, 2\)"):
        cg.record.check_curvature_call("Sequential", loss, out)
    out = cg(torch.randn(3, 4))
    cg.record.check_curvature_call("Sequential", out.sum(), out)


def test_an_empty_batch_leaves_the_rule_check_to_the_next_call():
    class Cube(nn.Module):
        def forward(self, x):
            return 2 * x**3

    elementwise_rule(  # the derivatives of x^3, not of the module's 2 x^3
        Cube,
        function=lambda input: input**3,
        first=lambda input: 3 * input**2,
        second=lambda input: 6 * input,
    )
    try:
        cg = curvgraph.trace(nn.Sequential(nn.Linear(4, 3), Cube()))
        assert cg(torch.randn(0, 4)).shape == (0, 3)
        with pytest.raises(curvgraph.CurvGraphError, match="does not compute the module"):
            cg(torch.randn(5, 4))
    finally:
        unregister(Cube)


def test_the_curvature_entry_points_run_the_call_checks():
    model = nn.Sequential(nn.Linear(4, 2))
    cg = curvgraph.trace(model)
    y = torch.tensor([0, 1, 0])
    with torch.no_grad():
        out = cg(torch.randn(3, 4))
    loss = F.cross_entropy(out, y)
    with pytest.raises(curvgraph.CurvGraphError, match="gradients disabled"):
        cg.curvature(loss, out, method="exact")
    out = cg(torch.randn(0, 4))
    with pytest.raises(curvgraph.CurvGraphError, match="the batch is empty"):
        cg.curvature(F.cross_entropy(out, y[:0], reduction="sum"), out, method="exact")
    with pytest.raises(curvgraph.CurvGraphError, match="the batch is empty"):
        cg.backward_hessian(torch.eye(2))
