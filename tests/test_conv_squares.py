"""``squared_weight_rows`` (the convolution's exact GGN diagonal) against per-sample gradients."""

from __future__ import annotations

import pytest
import torch

from curvgraph.rules.layers import conv_squares


@pytest.mark.parametrize("path", ["_by_samples", "_by_position_pairs", "squared_weight_rows"])
@pytest.mark.parametrize(
    "k, n, g, o, i, p", [(3, 5, 1, 4, 6, 7), (10, 4, 2, 3, 5, 4), (1, 3, 1, 2, 3, 1)]
)
def test_squared_rows_equal_summed_squares_of_per_sample_gradients(path, k, n, g, o, i, p):
    torch.manual_seed(0)
    unfolded = torch.randn(n, g, i, p, dtype=torch.float64)
    factors = torch.randn(k, n, g, o, p, dtype=torch.float64)
    per_sample = torch.einsum("kngop,ngip->kngoi", factors, unfolded)
    expected = (per_sample**2).sum((0, 1))
    torch.testing.assert_close(getattr(conv_squares, path)(unfolded, factors), expected)


def test_chunks_of_samples_add_up(monkeypatch):
    monkeypatch.setattr(conv_squares, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    torch.manual_seed(1)
    unfolded = torch.randn(5, 1, 4, 3, dtype=torch.float64)
    factors = torch.randn(2, 5, 1, 3, 3, dtype=torch.float64)
    expected = (torch.einsum("kngop,ngip->kngoi", factors, unfolded) ** 2).sum((0, 1))
    for path in (conv_squares._by_samples, conv_squares._by_position_pairs):
        torch.testing.assert_close(path(unfolded, factors), expected)


@pytest.mark.parametrize("kernel, size", [(3, 4), (2, 5)])  # P = 4 (pairs path), P = 16
def test_diag_of_a_cnn_equals_torch_func(kernel, size):
    """``method="diag"`` end to end against ``sum_n diag(J_n^T H_n J_n)`` from ``torch.func``."""
    import curvgraph

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, kernel), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    ).double()
    x, y = torch.randn(4, 2, size, size, dtype=torch.float64), torch.randint(0, 5, (4,))
    model(x)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    diag = cg.curvature(loss, out, method="diag")
    params = dict(model.named_parameters())

    def f(p, xn):
        return torch.func.functional_call(model, p, (xn.unsqueeze(0),))[0]

    for name, p in params.items():
        expected = torch.zeros_like(p).flatten()
        for xn, out_n in zip(x, out.detach()):
            jac = torch.func.jacrev(f)(params, xn)[name].reshape(5, -1)  # [C, numel]
            prob = out_n.softmax(-1)
            hessian = (torch.diag(prob) - torch.outer(prob, prob)) / x.shape[0]
            expected += ((hessian @ jac) * jac).sum(0)
        torch.testing.assert_close(diag[name].to_dense().diagonal(), expected)
