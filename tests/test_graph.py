"""Tracing, the CurvGraph API and its errors on bad input (each message asserted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph

DTYPE = torch.float64


class Functional(nn.Module):
    """Functional and method spellings, an in-place activation and a size-based view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = F.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        x = torch.sigmoid(self.fc(x))
        return F.elu(x).tanh()


def test_outputs_parameters_and_gradients_match_the_model():
    torch.manual_seed(0)
    model = Functional().to(DTYPE)
    cg = curvgraph.trace(model)
    assert list(cg.parameters()) == list(model.parameters())
    x = torch.randn(4, 1, 6, 6, dtype=DTYPE)
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_model_is_not_modified():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    cg = curvgraph.trace(model)
    cg(torch.randn(2, 3)).sum().backward()
    assert list(model.modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(k.startswith("_curv") for m in model.modules() for k in vars(m))


def test_functional_spellings_and_inplace_give_exact_blocks():
    """N = 1 identity on a model written with F.*, torch.*, Tensor methods, inplace ReLU."""
    torch.manual_seed(1)
    model = Functional().to(DTYPE)
    x = torch.randn(1, 1, 6, 6, dtype=DTYPE)
    y = torch.tensor([2])
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="hessian")
    params = dict(model.named_parameters())
    for name, p in params.items():

        def loss_of(value, name=name):
            out = torch.func.functional_call(model, {**params, name: value}, (x,))
            return F.cross_entropy(out, y)

        expected = torch.func.hessian(loss_of)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)


def test_print_table_lists_nodes_ops_rules_parameters_and_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    cg = curvgraph.trace(model)
    assert "output shapes appear after a forward pass" in repr(cg)
    cg(torch.randn(5, 4))
    table = str(cg)
    for expected in [
        "node",
        "op",
        "rule",
        "parameters",
        "output shape",
        "torch.nn.Linear",
        "sigmoid",
        "0.weight, 0.bias",
        "5x3",
        "5x2",
    ]:
        assert expected in table


def test_unsupported_ops_are_all_listed_with_source_lines():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LocalResponseNorm(2)

        def forward(self, x):
            x = torch.cumprod(self.fc(x), dim=1)
            return self.norm(torch.logcumsumexp(x, 1))

    with pytest.raises(curvgraph.UnsupportedOpError) as info:
        curvgraph.trace(Model())
    message = str(info.value)
    assert "3 node(s) have no usable rule" in message
    for expected in [
        "torch.cumprod",
        "torch.logcumsumexp",
        "torch.nn.LocalResponseNorm",
        "'norm'",
        "test_graph.py",
        "x = torch.cumprod(self.fc(x), dim=1)",
        "@curvgraph.register_rule",
    ]:
        assert expected in message
    assert len(info.value.nodes) == 3


def test_unsupported_configuration_is_reported():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(curvgraph.UnsupportedOpError, match="padding_mode='reflect'"):
        curvgraph.trace(model)


def test_data_dependent_control_flow_explains_the_leaf_module_route():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(curvgraph.TraceError, match="control flow.*register_rule"):
        curvgraph.trace(Branchy())


def _setup(n=4):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    cg = curvgraph.trace(model)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    return model, cg, x, y


def test_curvature_before_forward_is_an_error():
    _, cg, _, _ = _setup()
    with pytest.raises(curvgraph.CurvGraphError, match="no forward pass recorded.*cg\\(x\\)"):
        cg.backward_hessian(torch.eye(2))


def test_output_hessian_of_wrong_shape_is_an_error():
    _, cg, x, _ = _setup()
    cg(x)
    with pytest.raises(ValueError, match=r"output of shape \(4, 2\): expected \(2, 2\)"):
        cg.backward_hessian(torch.eye(3))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        cg.backward_hessian(torch.full((2, 2), float("nan")))


def test_nan_loss_is_an_error():
    _, cg, x, y = _setup()
    out = cg(x * float("nan"))
    loss = F.cross_entropy(out, y)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        curvgraph.loss_hessian(loss, out)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        cg.curvature(loss, out)


def test_frozen_parameter_gets_no_block_and_no_error():
    model, cg, x, y = _setup()
    model[0].weight.requires_grad_(False)
    out = cg(x)
    F.cross_entropy(out, y).backward()
    curv = cg.curvature(F.cross_entropy(out, y), out)
    assert list(curv) == ["0.bias", "2.weight", "2.bias"]


def test_hessian_needs_gradients_or_the_loss():
    _, cg, x, y = _setup()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    with pytest.raises(curvgraph.CurvGraphError, match="call loss.backward"):
        cg.backward_hessian(curvgraph.loss_hessian(loss, out), curvature="hessian")
    cg.curvature(loss, out, curvature="hessian")  # computes the gradients itself


def test_contradicting_curvature_spellings_and_unknown_values():
    _, cg, x, y = _setup()
    out = cg(x)
    H = curvgraph.loss_hessian(F.cross_entropy(out, y), out)
    with pytest.raises(ValueError, match="contradicts"):
        cg.backward_hessian(H, curvature="ggn", modify_2nd_order_terms="abs")
    with pytest.raises(ValueError, match="expected one of"):
        cg.backward_hessian(H, curvature="fisher")
    with pytest.raises(ValueError, match="modify_2nd_order_terms='max'"):
        cg.backward_hessian(H, modify_2nd_order_terms="max")
    with pytest.raises(ValueError, match="method='newton'"):
        cg.curvature(F.cross_entropy(out, y), out, method="newton")
    with pytest.raises(ValueError, match="approximates the GGN"):
        cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method="kfac")


def test_size_limit_names_the_tensor_and_suggests_other_methods():
    model = nn.Sequential(nn.Linear(3, 50), nn.Sigmoid(), nn.Linear(50, 2))
    cg = curvgraph.trace(model)
    out = cg(torch.randn(2, 3))
    H = curvgraph.loss_hessian(F.cross_entropy(out, torch.tensor([0, 1])), out)
    with pytest.raises(curvgraph.CurvatureSizeError, match=r"50 x 50.*max_features=20.*exact"):
        cg.backward_hessian(H, max_features=20)


def test_random_op_in_training_mode_needs_eval():
    # (dropout in training mode is supported: its mask is recorded, tests/test_coverage_models.py)
    model = nn.Sequential(nn.Linear(3, 3), nn.RReLU(), nn.Linear(3, 2))
    cg = curvgraph.trace(model)
    out = cg(torch.randn(2, 3))
    H = curvgraph.loss_hessian(F.cross_entropy(out, torch.tensor([0, 1])), out)
    with pytest.raises(ValueError, match="rrelu in training mode.*model.eval"):
        cg.backward_hessian(H)
    model.eval()
    out = cg(torch.randn(2, 3))
    cg.backward_hessian(H)


def test_weight_tying_hbp_batch_size_one_is_exact():
    """A module called twice: one block, the exact sum of both uses (frontier HBP)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(3)
    model = Tied().to(DTYPE)
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([2])
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    params = dict(model.named_parameters())
    for curvature in ["hessian", "ggn"]:
        curv = cg.curvature(loss, out, curvature=curvature)
        assert list(curv) == ["fc.weight", "fc.bias"]
        for name, p in params.items():

            def loss_of(value, name=name):
                out = torch.func.functional_call(model, {**params, name: value}, (x,))
                return F.cross_entropy(out, y)

            if curvature == "hessian":
                expected = torch.func.hessian(loss_of)(p.detach()).reshape(p.numel(), -1)
            else:

                def out_of(value, name=name):
                    return torch.func.functional_call(model, {**params, name: value}, (x,))

                jac = torch.func.jacrev(out_of)(p.detach()).reshape(3, -1)
                h_out = curvgraph.loss_hessian(loss, out)
                expected = jac.T @ h_out @ jac
            torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)


def test_reshape_that_mixes_the_batch_is_refused():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x).view(-1)

    cg = curvgraph.trace(Mix())
    out = cg(torch.randn(3, 4))
    with pytest.raises(ValueError, match="mixes the batch axis"):
        cg.backward_hessian(torch.eye(1) if out.dim() == 1 else torch.eye(2))


def test_tensor_attributes_are_refused_clearly_and_parameter_transforms_are_not():
    class Attr(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.log_scale = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            h = self.fc(x).unsqueeze(1).mT.flatten(1)
            return h * self.log_scale.exp()

    with pytest.raises(curvgraph.UnsupportedOpError) as info:
        curvgraph.trace(Attr())
    message = str(info.value)
    assert "attribute 'mT'" in message and "x.transpose(-2, -1)" in message
    assert "exp" not in message  # derived parameters: tests/test_derived_parameters.py


def test_indexing_the_batch_axis_is_refused():
    class Index(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)[0]

    with pytest.raises(curvgraph.UnsupportedOpError, match="keeps dimension 0"):
        curvgraph.trace(Index())
