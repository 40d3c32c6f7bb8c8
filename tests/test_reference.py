"""Cross-checks of the float64 reference oracles in ``tests/reference.py``.

The references are validated against each other and against closed forms:

- layer recursion with ``mod = identity`` == ``hessian_blocks`` and with ``mod = 0`` ==
  ``ggn_blocks`` (batch size 1, as the recursion requires);
- ``hessian_blocks`` == ``torch.autograd.functional.hessian`` (double backward, an
  independent code path); batch additivity of ``hessian_blocks`` / ``ggn_blocks``;
- piecewise-linear nets: GGN == Hessian; a single Linear layer: Hessian == GGN == PCH;
- Loewner order: GGN <= PCH-clip <= PCH-abs and Hessian <= PCH-clip;
- closed forms of the loss output Hessian (cross-entropy, MSE; mean and sum) and of a
  Linear-Sigmoid-Linear PCH bias block.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

try:  # tests/ on sys.path (no tests/__init__.py, pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64
ATOL = 1e-10
RTOL = 1e-8
PSD_TOL = -1e-10

LOSSES = {
    "ce-mean": F.cross_entropy,
    "ce-sum": functools.partial(F.cross_entropy, reduction="sum"),
    "mse-mean": F.mse_loss,
    "mse-sum": functools.partial(F.mse_loss, reduction="sum"),
}


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def sigmoid_mlp() -> nn.Sequential:
    """Linear(4, 3) -> Sigmoid -> Linear(3, 3)."""
    return nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 3)).to(DTYPE)


def tanh_relu_mlp() -> nn.Sequential:
    """Linear(4, 4) -> Tanh -> Linear(4, 3) -> ReLU -> Linear(3, 3)."""
    return nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)
    ).to(DTYPE)


def relu_mlp() -> nn.Sequential:
    """Linear(4, 4) -> ReLU -> Linear(4, 3) -> ReLU -> Linear(3, 3) (piecewise linear)."""
    return nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)
    ).to(DTYPE)


def tiny_cnn() -> nn.Sequential:
    """Conv2d(1, 2, 3) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(8, 3); input 1x6x6."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).to(DTYPE)


def linear_model() -> nn.Sequential:
    """A single Linear(4, 3)."""
    return nn.Sequential(nn.Linear(4, 3)).to(DTYPE)


MODELS = {
    "sigmoid_mlp": (sigmoid_mlp, (4,)),
    "tanh_relu_mlp": (tanh_relu_mlp, (4,)),
    "relu_mlp": (relu_mlp, (4,)),
    "tiny_cnn": (tiny_cnn, (1, 6, 6)),
    "linear": (linear_model, (4,)),
}
NUM_CLASSES = 3


def make_problem(model_name: str, loss_name: str, batch: int, seed: int = 0):
    """Return ``(model, x, y, loss_fn)`` in float64 with a fixed seed."""
    _seed(seed)
    factory, in_shape = MODELS[model_name]
    model = factory()
    x = torch.randn(batch, *in_shape, dtype=DTYPE)
    if loss_name.startswith("ce"):
        y = torch.randint(NUM_CLASSES, (batch,))
    else:
        y = torch.randn(batch, NUM_CLASSES, dtype=DTYPE)
    return model, x, y, LOSSES[loss_name]


def assert_blocks_close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(
            actual[name], expected[name], atol=atol, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def min_eig(matrix: torch.Tensor) -> float:
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2).min().item()


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_nondegenerate(blocks: dict) -> None:
    """Every block is nonzero (no dead ReLU layer makes a comparison vacuous)."""
    for name, block in blocks.items():
        assert block.abs().max() > 1e-8, f"{name}: block is zero, choose another seed"


# ---------------------------------------------------------------------------- helpers


def test_modify_eigenvalues_bilinear_block():
    """``[[0, g], [g, 0]]`` has eigenvalues ``+-g``: abs gives ``|g| I``, clip the + part."""
    g = -0.7
    r = torch.tensor([[0.0, g], [g, 0.0]], dtype=DTYPE)
    torch.testing.assert_close(ref.modify_eigenvalues(r, "identity"), r)
    torch.testing.assert_close(ref.modify_eigenvalues(r, "zero"), torch.zeros_like(r))
    torch.testing.assert_close(
        ref.modify_eigenvalues(r, "abs"), abs(g) * torch.eye(2, dtype=DTYPE), atol=ATOL, rtol=0
    )
    # eigenvector of +|g| for g < 0 is (1, -1)/sqrt(2)
    clip = abs(g) / 2 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=DTYPE)
    torch.testing.assert_close(ref.modify_eigenvalues(r, "clip"), clip, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        ref.modify_eigenvalues(r, "square")


def test_sequential_requires_batch_size_one():
    model, x, y, loss_fn = make_problem("sigmoid_mlp", "ce-mean", batch=2)
    layers = list(model.named_children())
    with pytest.raises(ValueError, match="batch size 1"):
        ref.hessian_blocks_sequential(layers, x, y, loss_fn)
    with pytest.raises(ValueError, match="batch size 1"):
        ref.pch_blocks_sequential(layers, x, y, loss_fn, "abs")
    with pytest.raises(ValueError):
        ref.pch_blocks_sequential(layers, x[:1], y[:1], loss_fn, "identity")


# ---------------------------------------------------------- loss output Hessian forms


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_output_hessian_cross_entropy(reduction):
    _seed(1)
    n, c = 5, 4
    z = torch.randn(n, c, dtype=DTYPE)
    y = torch.randint(c, (n,))
    loss_fn = functools.partial(F.cross_entropy, reduction=reduction)
    p = z.softmax(dim=1)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    if reduction == "mean":
        expected = expected / n
    torch.testing.assert_close(ref.loss_output_hessian(z, y, loss_fn), expected, atol=ATOL, rtol=0)
    # per-sample blocks as well
    per_sample = ref.per_sample_output_hessians(z, y, loss_fn)
    scale = 1 / n if reduction == "mean" else 1.0
    torch.testing.assert_close(
        per_sample, scale * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_output_hessian_mse(reduction):
    _seed(2)
    n, c = 5, 4
    z = torch.randn(n, c, dtype=DTYPE)
    y = torch.randn(n, c, dtype=DTYPE)
    loss_fn = functools.partial(F.mse_loss, reduction=reduction)
    scale = 2.0 / c if reduction == "mean" else 2.0 * n
    expected = scale * torch.eye(c, dtype=DTYPE)
    torch.testing.assert_close(ref.loss_output_hessian(z, y, loss_fn), expected, atol=ATOL, rtol=0)


# ------------------------------------------------- independent checks of the direct oracles


def test_hessian_blocks_match_autograd_double_backward():
    """``torch.func.hessian`` blocks == ``torch.autograd.functional.hessian`` blocks."""
    model, x, y, loss_fn = make_problem("tanh_relu_mlp", "ce-mean", batch=4)
    blocks = ref.hessian_blocks(model, x, y, loss_fn)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name, value in params.items():

        def loss_of(theta, name=name):
            out = torch.func.functional_call(model, {**params, name: theta}, (x,))
            return loss_fn(out, y)

        expected = torch.autograd.functional.hessian(loss_of, value)
        expected = expected.reshape(value.numel(), value.numel())
        torch.testing.assert_close(blocks[name], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("loss_name", ["mse-mean", "mse-sum"])
def test_linear_model_mse_closed_form(loss_name):
    """Linear ``z = W x + b``, MSE: ``G_W = H (x) sum_n x_n x_n^T``, ``G_b = N H``.

    ``H = d2L/dz_n2 = s I`` with ``s = 2/(N C)`` (mean) or ``2`` (sum); Kronecker order
    matches the row-major vec of ``W`` (index ``(c, d)``).
    """
    n = 6
    model, x, y, loss_fn = make_problem("linear", loss_name, batch=n)
    s = 2.0 / (n * NUM_CLASSES) if loss_name == "mse-mean" else 2.0
    eye = torch.eye(NUM_CLASSES, dtype=DTYPE)
    expected = {"0.weight": torch.kron(s * eye, x.T @ x), "0.bias": n * s * eye}
    assert_blocks_close(ref.ggn_blocks(model, x, y, loss_fn), expected)
    assert_blocks_close(ref.hessian_blocks(model, x, y, loss_fn), expected)


@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
def test_batch_additivity(loss_name):
    """Per-sample losses add: batch blocks == sum of batch-size-1 recursion blocks.

    For mean reduction ``L = (1/N) sum_n l_n`` (the batch-1 loss of a sample is ``l_n`` with
    the same per-sample scaling), so the batch block is ``(1/N) sum_n`` of batch-1 blocks.
    """
    n = 4
    model, x, y, loss_fn = make_problem("sigmoid_mlp", loss_name, batch=n)
    layers = list(model.named_children())
    scale = 1.0 / n if loss_name.endswith("mean") else 1.0
    for batch_fn, single_fn in [
        (ref.hessian_blocks, ref.hessian_blocks_sequential),
        (ref.ggn_blocks, ref.ggn_blocks_sequential),
    ]:
        singles = [single_fn(layers, x[i : i + 1], y[i : i + 1], loss_fn) for i in range(n)]
        expected = {k: scale * sum(s[k] for s in singles) for k in singles[0]}
        assert_blocks_close(batch_fn(model, x, y, loss_fn), expected)


# ------------------------------------------------------------------ recursion identities


RECURSION_CASES = [
    (model_name, loss_name)
    for model_name in ["sigmoid_mlp", "tanh_relu_mlp", "tiny_cnn"]
    for loss_name in LOSSES
]


@pytest.mark.parametrize(("model_name", "loss_name"), RECURSION_CASES)
def test_recursion_identity_and_zero(model_name, loss_name):
    """``mod = identity`` -> exact Hessian blocks; ``mod = 0`` -> exact GGN blocks (N = 1)."""
    model, x, y, loss_fn = make_problem(model_name, loss_name, batch=1, seed=4)
    layers = list(model.named_children())
    hess = ref.hessian_blocks(model, x, y, loss_fn)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert set(hess) == {name for name, _ in model.named_parameters()}
    assert_nondegenerate(ggn)
    assert_blocks_close(ref.hessian_blocks_sequential(layers, x, y, loss_fn), hess)
    assert_blocks_close(ref.ggn_blocks_sequential(layers, x, y, loss_fn), ggn)
    if model_name != "tiny_cnn":  # smooth activations: the residual terms matter
        assert max_abs_diff(hess, ggn) > 1e-6


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", ["relu_mlp", "tiny_cnn"])
def test_piecewise_linear_ggn_equals_hessian(model_name, loss_name):
    """ReLU/max-pool nets are linear in each parameter block a.e.: GGN == Hessian (any N)."""
    model, x, y, loss_fn = make_problem(model_name, loss_name, batch=5, seed=4)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert_nondegenerate(ggn)
    assert_blocks_close(ggn, ref.hessian_blocks(model, x, y, loss_fn))


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_linear_model_all_curvatures_equal(loss_name):
    """Single Linear layer: no residuals, Hessian == GGN == PCH-abs == PCH-clip."""
    model, x, y, loss_fn = make_problem("linear", loss_name, batch=1, seed=5)
    layers = list(model.named_children())
    hess = ref.hessian_blocks(model, x, y, loss_fn)
    assert_blocks_close(ref.ggn_blocks(model, x, y, loss_fn), hess)
    for mode in ("abs", "clip"):
        assert_blocks_close(ref.pch_blocks_sequential(layers, x, y, loss_fn, mode), hess)
    # batched as well
    model, x, y, loss_fn = make_problem("linear", loss_name, batch=5, seed=5)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert_blocks_close(ggn, ref.hessian_blocks(model, x, y, loss_fn))


# ------------------------------------------------------------------------- PCH ordering


def assert_loewner_order(hess: dict, ggn: dict, pch_abs: dict, pch_clip: dict) -> None:
    """GGN <= PCH-clip <= PCH-abs, Hessian <= PCH-clip, and GGN, PCH are PSD (convex loss)."""
    for name in hess:
        for label, diff in [
            ("abs - ggn", pch_abs[name] - ggn[name]),
            ("clip - ggn", pch_clip[name] - ggn[name]),
            ("abs - clip", pch_abs[name] - pch_clip[name]),
            ("clip - hessian", pch_clip[name] - hess[name]),
            ("abs - hessian", pch_abs[name] - hess[name]),
            ("ggn", ggn[name]),
            ("clip", pch_clip[name]),
        ]:
            assert min_eig(diff) >= PSD_TOL, f"{name}: {label} not PSD ({min_eig(diff):.3e})"
        for blocks in (ggn, pch_abs, pch_clip):
            torch.testing.assert_close(blocks[name], blocks[name].T, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("model_name", "loss_name"), RECURSION_CASES)
def test_pch_loewner_order(model_name, loss_name):
    model, x, y, loss_fn = make_problem(model_name, loss_name, batch=1, seed=7)
    layers = list(model.named_children())
    hess = ref.hessian_blocks(model, x, y, loss_fn)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert_nondegenerate(ggn)
    pch_abs = ref.pch_blocks_sequential(layers, x, y, loss_fn, "abs")
    pch_clip = ref.pch_blocks_sequential(layers, x, y, loss_fn, "clip")
    assert pch_abs.keys() == hess.keys() == pch_clip.keys()
    assert_loewner_order(hess, ggn, pch_abs, pch_clip)
    if model_name == "tiny_cnn":  # ReLU and max-pool have no residual: all coincide
        assert_blocks_close(pch_abs, ggn)
        assert_blocks_close(pch_clip, ggn)
    else:  # smooth activations: PCH-abs is strictly different from the GGN
        assert max_abs_diff(pch_abs, ggn) > 1e-6


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_pch_sigmoid_bias_closed_form(loss_name):
    """Linear-Sigmoid-Linear, first bias (``J_b1 = I``), N = 1::

        P_b1 = diag(s') W2^T H_z W2 diag(s') + mod(diag(s'' * (W2^T g_z)))

    with ``s = sigmoid(W1 x + b1)``, ``s' = s (1 - s)``, ``s'' = s' (1 - 2 s)``, ``g_z, H_z``
    the loss gradient and Hessian at the output; ``mod`` acts elementwise on the diagonal.
    """
    model, x, y, loss_fn = make_problem("sigmoid_mlp", loss_name, batch=1, seed=7)
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        s = torch.sigmoid(lin1(x))[0]
        z = model(x)
    d1 = s * (1 - s)
    d2 = d1 * (1 - 2 * s)
    g_z = torch.func.grad(lambda t: loss_fn(t, y))(z)[0]
    h_z = ref.loss_output_hessian(z, y, loss_fn)
    w2 = lin2.weight.detach()
    gauss_newton = d1[:, None] * (w2.T @ h_z @ w2) * d1[None, :]
    residual = d2 * (w2.T @ g_z)
    assert residual.abs().min() > 1e-8  # the test is not vacuous
    layers = list(model.named_children())
    expected = {
        "abs": gauss_newton + torch.diag(residual.abs()),
        "clip": gauss_newton + torch.diag(residual.clamp(min=0)),
    }
    for mode, block in expected.items():
        got = ref.pch_blocks_sequential(layers, x, y, loss_fn, mode)["0.bias"]
        torch.testing.assert_close(got, block, atol=ATOL, rtol=RTOL)
    hess = ref.hessian_blocks(model, x, y, loss_fn)["0.bias"]
    torch.testing.assert_close(hess, gauss_newton + torch.diag(residual), atol=ATOL, rtol=RTOL)


class ExpScale(nn.Module):
    """``y = x * exp(s)`` per feature: a parameter that enters nonlinearly (``R_s != 0``)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(0.5 * torch.randn(features, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s.exp()


@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
def test_nonlinear_parameter_residual(loss_name):
    """A parameter with ``R_theta != 0``: identity/zero/abs/clip all differ and stay ordered.

    For ``y = x * exp(s)``: ``R_s = diag(g * x * exp(s))``, so the parameter residual must
    enter the recursion (linear layers alone never exercise it).
    """
    _seed(8)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), ExpScale(3), nn.Linear(3, 3)).to(DTYPE)
    x = torch.randn(1, 4, dtype=DTYPE)
    if loss_name.startswith("ce"):
        y = torch.randint(NUM_CLASSES, (1,))
    else:
        y = torch.randn(1, NUM_CLASSES, dtype=DTYPE)
    loss_fn = LOSSES[loss_name]
    layers = list(model.named_children())
    hess = ref.hessian_blocks(model, x, y, loss_fn)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert "2.s" in hess
    assert (hess["2.s"] - ggn["2.s"]).abs().max() > 1e-6
    assert_blocks_close(ref.hessian_blocks_sequential(layers, x, y, loss_fn), hess)
    assert_blocks_close(ref.ggn_blocks_sequential(layers, x, y, loss_fn), ggn)
    pch_abs = ref.pch_blocks_sequential(layers, x, y, loss_fn, "abs")
    pch_clip = ref.pch_blocks_sequential(layers, x, y, loss_fn, "clip")
    assert_loewner_order(hess, ggn, pch_abs, pch_clip)
    # closed form of the scale block: J_s = diag(x * exp(s)) with x the ExpScale input
    with torch.no_grad():
        u = model[:2](x)[0]
        z = model(x)
    jac = torch.diag(u * model[2].s.detach().exp())
    g_z = torch.func.grad(lambda t: loss_fn(t, y))(z)[0]
    g_y = model[3].weight.detach().T @ g_z
    residual = g_y * u * model[2].s.detach().exp()
    gauss_newton = jac @ model[3].weight.detach().T @ ref.loss_output_hessian(z, y, loss_fn)
    gauss_newton = gauss_newton @ model[3].weight.detach() @ jac
    torch.testing.assert_close(hess["2.s"], gauss_newton + torch.diag(residual), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        pch_abs["2.s"], gauss_newton + torch.diag(residual.abs()), atol=ATOL, rtol=0
    )


# --------------------------------------------------------- property-based random MLPs


ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    loss_name=st.sampled_from(sorted(LOSSES)),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(widths, activation, loss_name, seed):
    """Random MLPs: recursion identities and the PCH Loewner order hold."""
    torch.manual_seed(seed)
    widths = [*widths, NUM_CLASSES]
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            modules.append(ACTIVATIONS[activation]())
        modules.append(nn.Linear(fan_in, fan_out))
    model = nn.Sequential(*modules).to(DTYPE)
    x = torch.randn(1, widths[0], dtype=DTYPE)
    if loss_name.startswith("ce"):
        y = torch.randint(NUM_CLASSES, (1,))
    else:
        y = torch.randn(1, NUM_CLASSES, dtype=DTYPE)
    loss_fn = LOSSES[loss_name]
    layers = list(model.named_children())
    hess = ref.hessian_blocks(model, x, y, loss_fn)
    ggn = ref.ggn_blocks(model, x, y, loss_fn)
    assert_blocks_close(ref.hessian_blocks_sequential(layers, x, y, loss_fn), hess)
    assert_blocks_close(ref.ggn_blocks_sequential(layers, x, y, loss_fn), ggn)
    pch_abs = ref.pch_blocks_sequential(layers, x, y, loss_fn, "abs")
    pch_clip = ref.pch_blocks_sequential(layers, x, y, loss_fn, "clip")
    assert_loewner_order(hess, ggn, pch_abs, pch_clip)
