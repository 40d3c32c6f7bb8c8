"""Memory of the full-network products (``structure="full"``), each mechanism checked.

- The flat result is allocated first and each parameter's products are summed into its
  slice as the walk reaches them (no second copy of all products at the end).
- ``relu`` forms no ``phi'``: its products read the recorded output
  (``threshold_backward``), so the products cache nothing of an activation's size for it.
- A convolution's tangent is summed into its first term (no stacked copy plus a sum).

The products stay exact: dense ``torch.func`` GGN / Hessian in float64, cross terms included.
"""

import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvgraph
from benchmarks.tensor_memory import tensor_peak
from curvgraph.methods import exact as exact_module
from curvgraph.rules import lookup_rule

DT = torch.float64
SLOW = os.environ.get("CURVGRAPH_SLOW_TESTS") == "1"


def _conv_relu():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def _dense(model, x, y, curvature):
    """The whole ``D x D`` GGN or Hessian by torch.func (parameters in model order)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def out_of(flat):
        parts = dict(zip(names, flat.split(sizes)))
        values = {n: parts[n].reshape(params[n].shape) for n in names}
        return functional_call(model, values, (x,))

    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss_of_output(out):
        return nn.functional.cross_entropy(out, y)

    if curvature == "hessian":
        return hessian(lambda f: loss_of_output(out_of(f)))(flat)
    z = out_of(flat).detach()
    jac = jacrev(out_of)(flat).reshape(z.numel(), -1)
    h = hessian(loss_of_output)(z).reshape(z.numel(), z.numel())
    return jac.T @ h @ jac


def _full(model, x, y, curvature):
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = nn.functional.cross_entropy(out, y)
    return cg, cg.curvature(loss, out, curvature, "exact", structure="full")


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_products_are_summed_into_the_flat_result(curvature, monkeypatch):
    """Every parameter's product is a slice of the operator's flat result, and exact."""
    torch.manual_seed(0)
    model = _conv_relu().to(DT)
    x, y = torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 3, (5,))
    _, op = _full(model, x, y, curvature)
    seen = []
    original = exact_module.ExactProducts.matmat

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(exact_module.ExactProducts, "matmat", recording)
    columns = torch.randn(3, op.numel, dtype=DT, generator=torch.Generator().manual_seed(1))
    product = op.matmat(columns)
    torch.testing.assert_close(
        product, columns @ _dense(model, x, y, curvature), rtol=1e-9, atol=1e-11
    )
    (parts,) = seen
    assert set(parts) == set(op.names)
    pointer = product.untyped_storage().data_ptr()
    for name, part in parts.items():
        assert part.untyped_storage().data_ptr() == pointer, name


def test_full_product_holds_the_products_once():
    """A product's tensors peak below the flat result plus one parameter's product, twice.

    With the parameters' products kept apart until the end and then copied into the flat
    result, the peak holds all of them twice (about ``2 D`` entries); summed into the flat
    result it is ``D`` plus the largest parameter's transient product.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(120, 150), nn.ReLU(), nn.Linear(150, 120), nn.Linear(120, 3))
    x, y = torch.randn(2, 120), torch.randint(0, 3, (2,))
    _, op = _full(model, x, y, "ggn")
    v = torch.randn(op.numel)
    op.matvec(v)  # caches filled
    largest = max(p.numel() for p in model.parameters())
    peak = tensor_peak(lambda: op.matvec(v))["delta_bytes"]
    assert peak < (op.numel + 1.5 * largest) * 4, (peak, op.numel * 4)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_relu_products_form_no_phi_prime(curvature):
    """relu's products read its recorded output: no ``phi'`` is cached for its nodes."""
    torch.manual_seed(0)
    model = _conv_relu().to(DT)
    x, y = torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 3, (5,))
    _, op = _full(model, x, y, curvature)
    v = torch.randn(op.numel, dtype=DT)
    torch.testing.assert_close(
        op.matvec(v), _dense(model, x, y, curvature) @ v, rtol=1e-9, atol=1e-11
    )
    op.matvec(v)
    products = op.engine.products
    relu = lookup_rule(nn.ReLU)
    nodes = [info.node.name for info in products.walk.order if info.rule is relu]
    assert len(nodes) == 2
    for name in nodes:
        cached = products.contexts[name].cache
        assert "d1" not in cached, (name, sorted(cached))


def test_relu_product_equals_phi_prime_times_t_into_out():
    """``diagonal_product`` with and without ``out``, zeros included, columns broadcast."""
    relu = lookup_rule(nn.ReLU)
    cg = curvgraph.trace(nn.Sequential(nn.ReLU()))
    x = torch.randn(4, 5, dtype=DT)
    x[0, :2] = 0.0  # relu'(0) = 0, as the rule's phi'
    cg(x)
    (ctx,) = [c for c in cg.record.contexts.values()]
    t = torch.randn(3, 4, 5, dtype=DT)
    expected = relu.diagonal_jacobian(ctx) * t
    assert torch.equal(relu.diagonal_product(ctx, t), expected)
    into = t.clone()
    assert relu.diagonal_product(ctx, into, out=into) is into
    assert torch.equal(into, expected)


@pytest.mark.parametrize("columns", [1, 3])
def test_conv_tangent_is_summed_into_one_output(columns):
    """Input, weight and bias tangents: one output of ``[K, N, *out]`` alive, and exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    cg = curvgraph.trace(conv)
    x = torch.randn(4, 3, 16, 16)
    cg(x)
    (ctx,) = [c for c in cg.record.contexts.values()]
    rule = lookup_rule(nn.Conv2d)
    tangents = {
        "input": torch.randn(columns, *x.shape),
        "weight": torch.randn(columns, *conv.weight.shape),
        "bias": torch.randn(columns, *conv.bias.shape),
    }
    result = {}
    peak = tensor_peak(lambda: result.setdefault("jvp", rule.jvp(ctx, tangents)))["delta_bytes"]
    output = columns * ctx.output.numel() * 4
    # the result and one column's convolution besides it (not a stack and a sum as well)
    assert peak <= output + ctx.output.numel() * 4 * (columns > 1) + 64 * 1024, (peak, output)
    for k in range(columns):
        expected_k = nn.functional.conv2d(tangents["input"][k], conv.weight, padding=1)
        expected_k = expected_k + nn.functional.conv2d(
            x, tangents["weight"][k], tangents["bias"][k], padding=1
        )
        torch.testing.assert_close(result["jvp"][k], expected_k, rtol=1e-5, atol=1e-5)


def test_pooling_indices_are_computed_in_chunks_and_kept_as_int32(monkeypatch):
    """The argmax indices: chunks of samples pooled at a time, the result kept as int32.

    Alive at once at most: the int32 result ``I/2`` and one chunk's channels-last copy,
    pooled values and int64 indices (not the whole input's copy and two sets of indices).
    """
    from curvgraph.rules.linear_maps import pooling

    pool = nn.MaxPool2d(3, stride=2, padding=1)
    cg = curvgraph.trace(pool)
    x = torch.randn(8, 16, 28, 28)
    cg(x)
    (ctx,) = [c for c in cg.record.contexts.values()]
    rule = lookup_rule(nn.MaxPool2d)
    monkeypatch.setattr(pooling, "CHUNK_BYTES", x[:2].numel() * 4)  # 4 chunks of 2 samples
    indices = {}
    peak = tensor_peak(lambda: indices.setdefault("i", rule._indices(ctx)))["delta_bytes"]
    index_bytes = ctx.output.numel() * 8
    chunk = (x[:2].numel() * 4 + ctx.output[:2].numel() * (4 + 8)) * 1.5
    # the cached int32 indices, their int64 widening (the caller's), one chunk's buffers
    assert peak < index_bytes / 2 + index_bytes + chunk, (peak, index_bytes, chunk)
    _, expected = nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(indices["i"], expected.flatten(-2))
    assert ctx.cache["indices"].dtype == torch.int32
    assert indices["i"].dtype == torch.long


@pytest.mark.skipif(not SLOW, reason="compiles a graph (~20 s); set CURVGRAPH_SLOW_TESTS=1")
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_full_relu_products_compile_without_graph_breaks(curvature):
    """The in-place relu product (``out=``) and the writes into the flat result compile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    x, y = torch.randn(7, 6, dtype=DT), torch.randint(0, 3, (7,))
    _, op = _full(model, x, y, curvature)
    v = torch.randn(op.numel, dtype=DT)
    compiled = torch.compile(lambda operator, vector: operator.matvec(vector), fullgraph=True)
    torch.testing.assert_close(compiled(op, v), _dense(model, x, y, curvature) @ v)


def test_max_pool_outputs_read_by_a_rule_are_kept(monkeypatch):
    """The next convolution reads the pooled output: the record keeps it (no recomputation).

    A slim record may drop a tensor it can recompute cheaply; max pooling is not cheap on
    the CPU (about the cost of a convolution), so the products' set-up runs no pooling again.
    """
    from curvgraph.graph import slim

    torch.manual_seed(0)
    model = _conv_relu().to(DT)
    x, y = torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 3, (5,))
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    runs = []
    original = slim.Template.run

    def counting(self, values):
        runs.append(self.target)
        return original(self, values)

    monkeypatch.setattr(slim.Template, "run", counting)
    op = cg.curvature(loss, out, "ggn", "exact", structure="full")
    v = torch.randn(op.numel, dtype=DT)
    torch.testing.assert_close(op.matvec(v), _dense(model, x, y, "ggn") @ v)
    assert not [t for t in runs if isinstance(t, nn.MaxPool2d)], runs
