"""The memory rules of the exact products (``curvgraph.methods.column_stacks``).

The exact walks release tangents after their last use, keep a node's argument tangents only
where its residual acts on the products, overwrite a tangent or adjoint with a diagonal
Jacobian where only the walk holds it, and cache rule quantities per product. Checked here:
the products equal dense ``torch.func`` blocks (float64) on models where those paths run,
including the aliasing cases where they must not (a tangent read twice, one cotangent
handed to two arguments, a retained tangent); the in-place paths give the same bits as the
rules' own products; relu nodes are inert in the Hessian and tanh nodes are not; what a
product caches stays with the products, not on the record.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvgraph
from curvgraph.methods import column_stacks
from curvgraph.methods import exact as exact_module
from curvgraph.rules import lookup_rule

DT = torch.float64


class Branches(nn.Module):
    """A tangent read by a relu and by a later add; one cotangent handed to two arguments."""

    def __init__(self, activation):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.act = activation

    def forward(self, x):
        h = self.first(x)
        a = self.act(h)  # h is read again below: not its last use
        b = self.act(self.second(a)) + h  # the add's cotangent goes to both arguments
        return self.head(self.act(b) * 1.0 + a)


class ViewAlias(nn.Module):
    """A relu at the last use of a view whose base tangent is read again later."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.first(x)
        a = torch.relu(h.reshape(-1, 6))  # the reshape's tangent shares h's storage
        return self.head(a + h)


def conv_pool(activation):
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        activation,
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, padding=1),
        activation,
        nn.Flatten(),
        nn.Linear(64, 3),
    )


MODELS = {
    "conv_pool_relu": (lambda: conv_pool(nn.ReLU()), (5, 2, 8, 8)),
    "conv_pool_tanh": (lambda: conv_pool(nn.Tanh()), (5, 2, 8, 8)),
    "branches_relu": (lambda: Branches(nn.ReLU()), (6, 4)),
    "branches_tanh": (lambda: Branches(nn.Tanh()), (6, 4)),
    "view_alias": (ViewAlias, (6, 4)),
    "mlp_relu_inplace": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)),
        (6, 4),
    ),
}


def _setup(kind):
    torch.manual_seed(0)
    build, shape = MODELS[kind]
    model = build().to(DT)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randint(0, 3, (shape[0],))
    return model, x, y


def _dense_blocks(model, x, y, curvature):
    """Per-parameter dense blocks of the Hessian or the GGN (``J^T H_z J``) by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = {}
    for name, p in params.items():

        def loss_of(value, name=name):
            out = functional_call(model, {**params, name: value}, (x,))
            return nn.functional.cross_entropy(out, y)

        if curvature == "hessian":
            blocks[name] = hessian(loss_of)(p).reshape(p.numel(), p.numel())
            continue

        def out_of(value, name=name):
            return functional_call(model, {**params, name: value}, (x,))

        z = out_of(p).detach()
        jac = jacrev(out_of)(p).reshape(z.numel(), p.numel())
        h = hessian(lambda o: nn.functional.cross_entropy(o, y))(z).reshape(z.numel(), -1)
        blocks[name] = jac.T @ h @ jac
    return blocks


def _curvature(model, x, y, curvature):
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = nn.functional.cross_entropy(out, y)
    return cg, cg.curvature(loss, out, curvature=curvature, method="exact")


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_exact_blocks_equal_torch_func(kind, curvature):
    model, x, y = _setup(kind)
    _, curv = _curvature(model, x, y, curvature)
    reference = _dense_blocks(model, x, y, curvature)
    # every block's identity columns in one walk: the columns of all blocks travel together
    eyes = {n: torch.eye(b.numel, dtype=DT).reshape(b.numel, *b.shape) for n, b in curv.items()}
    dense = curv.matmat(eyes)
    for name, block in curv.items():
        got = dense[name].reshape(block.numel, -1)
        torch.testing.assert_close(got, reference[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch-abs"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_in_place_paths_give_the_rules_bits(kind, curvature, monkeypatch):
    """The same products with every in-place step refused (the rules' jvp / batch_vjp run)."""
    model, x, y = _setup(kind)
    _, curv = _curvature(model, x, y, curvature)
    g = torch.Generator().manual_seed(1)
    columns = {n: torch.randn(3, *b.shape, generator=g, dtype=DT) for n, b in curv.items()}
    fast = curv.matmat(columns)
    monkeypatch.setattr(exact_module, "exclusive", lambda tensor, live: False)
    slow = curv.matmat(columns)
    for name in columns:
        assert torch.equal(fast[name], slow[name]), name


def test_in_place_steps_run_on_a_relu_chain(monkeypatch):
    """On a plain conv/relu/pool chain the relu steps overwrite; the rule's products do not run."""
    model, x, y = _setup("conv_pool_relu")
    _, curv = _curvature(model, x, y, "ggn")
    relu = lookup_rule(nn.ReLU)
    calls = []
    for method in ("jvp", "batch_vjp"):
        original = getattr(type(relu), method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            if self is relu:
                calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(type(relu), method, counting)
    overwritten = []
    original_exclusive = exact_module.exclusive

    def recording(tensor, live):
        result = original_exclusive(tensor, live)
        overwritten.append(result)
        return result

    monkeypatch.setattr(exact_module, "exclusive", recording)
    curv.matvec({n: torch.randn(b.shape, dtype=DT) for n, b in curv.items()})
    assert overwritten and all(overwritten), overwritten
    assert calls == [], calls


def _products(curv):
    engine = next(iter(curv.values())).engine
    assert isinstance(engine, exact_module.ExactProducts)
    return engine


@pytest.mark.parametrize("activation, inert", [(nn.ReLU(), True), (nn.Tanh(), False)])
def test_relu_residuals_are_inert_and_tanh_residuals_act(activation, inert):
    torch.manual_seed(0)
    model = conv_pool(activation).to(DT)
    x, y = torch.randn(5, 2, 8, 8, dtype=DT), torch.randint(0, 3, (5,))
    _, curv = _curvature(model, x, y, "hessian")
    products = _products(curv)
    rule = lookup_rule(type(activation))
    nodes = {info.node for info in products.walk.order if info.rule is rule}
    assert len(nodes) == 2
    if inert:
        assert nodes <= products._inert
    else:
        assert nodes.isdisjoint(products._inert)


def test_a_product_caches_nothing_on_the_record():
    """What rules derive for the products stays with them, and is reused by the next one."""
    model, x, y = _setup("conv_pool_relu")
    cg, curv = _curvature(model, x, y, "ggn")
    contexts = cg.record.contexts
    before = {n: sorted(contexts[n].cache) for n in contexts}
    ones = {n: torch.ones(b.shape, dtype=DT) for n, b in curv.items()}
    first = curv.matvec(ones)
    assert {n: sorted(contexts[n].cache) for n in contexts} == before
    own = _products(curv).contexts
    assert any(own[n].cache for n in own)  # the pooling indices, for the next product
    assert all(own[n].cache is not contexts[n].cache for n in own)
    second = curv.matvec(ones)
    for name in first:
        assert torch.equal(first[name], second[name])


def test_exclusive_refuses_shared_and_partial_storage():
    buffer = torch.randn(4, 3)
    assert column_stacks.exclusive(buffer, [])
    assert column_stacks.exclusive(buffer.reshape(12), [])  # a whole-storage view
    assert not column_stacks.exclusive(buffer[:2], [])  # a slice of a larger buffer
    assert not column_stacks.exclusive(buffer, [buffer.view(12)])  # read elsewhere
    assert not column_stacks.exclusive(buffer, [buffer])  # the same tensor held twice
    assert not column_stacks.exclusive(torch.randn(3, 1).expand(3, 4), [])
    assert not column_stacks.exclusive(buffer.t(), [])  # not contiguous
    assert not column_stacks.exclusive(torch.randn(3, requires_grad=True), [])
