"""Independent float64 reference implementations of block curvature, used as test oracles.

Everything here is written with ``torch`` and ``torch.func`` only (it never imports
``curvgraph``), deliberately naive and explicit: every Jacobian and every second derivative
is taken by automatic differentiation of the forward function, with no structural shortcuts.
Use float64 models and inputs.

Conventions (those of ``design.md``, section 3):

- ``loss_fn(output, y)`` returns the scalar loss ``L`` with its reduction's scaling, e.g.
  ``torch.nn.functional.cross_entropy`` (mean: ``L = (1/N) sum_n l_n``) or
  ``functools.partial(torch.nn.functional.mse_loss, reduction="sum")``.
- Parameter dictionaries map names to tensors, as ``dict(model.named_parameters())``; block
  keys are those names. A block is a ``(numel, numel)`` matrix over the row-major
  vectorization of its parameter (``p.reshape(-1)``).
- The output's first axis is the batch axis ``n = 1..N``; all other axes are flattened into
  ``D`` features (``C`` classes for a classifier).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Signature of a loss: ``loss_fn(output, y) -> scalar``."""

MODIFICATIONS = ("identity", "zero", "abs", "clip")
"""Values of ``mode`` accepted by :func:`modify_eigenvalues`."""


def _detached_params(module: nn.Module, params: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Return ``params`` (default: ``module.named_parameters()``) as detached tensors."""
    if params is None:
        params = dict(module.named_parameters())
    return {name: p.detach() for name, p in params.items()}


def hessian_blocks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    params: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Exact per-parameter Hessian blocks of ``L = loss_fn(model(x), y)``.

    For every parameter ``theta`` (all other parameters held fixed)::

        H_theta = d2 L / d vec(theta)^2,   vec = row-major flattening,

    computed with ``torch.func.hessian`` of ``theta -> loss_fn(functional_call(model, ...), y)``.
    Tied parameters (one tensor under several module attributes) appear once and their block
    is the Hessian with respect to the shared tensor (all uses included).

    Args:
        model: The network; called through ``torch.func.functional_call``.
        x: Input batch, shape ``(N, ...)``.
        y: Targets accepted by ``loss_fn``.
        loss_fn: ``loss_fn(output, y) -> scalar`` including its reduction's scaling.
        params: Parameter values ``name -> tensor`` to evaluate at (default: the model's).

    Returns:
        ``name -> (numel, numel)`` Hessian block for every parameter.
    """
    params = _detached_params(model, params)
    blocks: dict[str, Tensor] = {}
    for name, value in params.items():

        def loss_of(theta: Tensor, name: str = name) -> Tensor:
            output = functional_call(model, {**params, name: theta}, (x,))
            return loss_fn(output, y)

        blocks[name] = hessian(loss_of)(value).reshape(value.numel(), value.numel())
    return blocks


def per_sample_output_hessians(output: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Per-sample loss Hessians ``d2L / dz_n2`` with respect to each sample's output.

    With ``z`` the full output tensor ``(N, D)`` (features flattened), the Hessian
    ``d2L / dz2`` of shape ``(N, D, N, D)`` is computed with ``torch.func.hessian`` and its
    diagonal blocks are returned::

        result[n] = d2L / dz_n dz_n   (D, D),   n = 1..N.

    The reduction's scaling is included (e.g. ``1/N`` for a mean cross-entropy). Off-diagonal
    blocks ``d2L / dz_n dz_m`` (``n != m``) are dropped; they vanish for losses that are sums
    over samples (cross-entropy, MSE, NLL, BCE).

    Args:
        output: Model output ``z``, shape ``(N, ...)``.
        y: Targets accepted by ``loss_fn``.
        loss_fn: ``loss_fn(output, y) -> scalar``.

    Returns:
        Tensor of shape ``(N, D, D)``.
    """
    output = output.detach()
    n, d = output.shape[0], output[0].numel()

    def loss_of(z: Tensor) -> Tensor:
        return loss_fn(z, y)

    full = hessian(loss_of)(output).reshape(n, d, n, d)
    # diagonal over (dim 0, dim 2) -> (D, D, N); move the batch axis first
    return torch.diagonal(full, dim1=0, dim2=2).permute(2, 0, 1)


def loss_output_hessian(output: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Batch-summed output Hessian of the loss (bpexts ``batch_summed_hessian``).

    ::

        H_out = sum_n d2L / dz_n2     (D, D),

    with ``d2L / dz_n2`` from :func:`per_sample_output_hessians` (``torch.func.hessian`` on
    the output). Examples: cross-entropy, mean reduction:
    ``(1/N) sum_n (diag p_n - p_n p_n^T)``; ``mse_loss`` mean: ``(2/D) I``; sum: ``2 N I``.

    Args:
        output: Model output ``z``, shape ``(N, ...)``.
        y: Targets accepted by ``loss_fn``.
        loss_fn: ``loss_fn(output, y) -> scalar``.

    Returns:
        Tensor of shape ``(D, D)``.
    """
    return per_sample_output_hessians(output, y, loss_fn).sum(dim=0)


def ggn_blocks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    params: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Exact per-parameter generalized Gauss-Newton (GGN) blocks.

    For every parameter ``theta``::

        G_theta = sum_n J_n^T (d2L / dz_n2) J_n,   J_n = d z_n / d vec(theta)   (D, numel),

    with ``J`` from ``torch.func.jacrev`` of ``theta -> functional_call(model, ...)(x)`` and
    ``d2L / dz_n2`` the per-sample diagonal blocks of ``torch.func.hessian`` of the loss with
    respect to the full output (see :func:`per_sample_output_hessians`; reduction scaling
    included).

    Args:
        model: The network; called through ``torch.func.functional_call``.
        x: Input batch, shape ``(N, ...)``.
        y: Targets accepted by ``loss_fn``.
        loss_fn: ``loss_fn(output, y) -> scalar``.
        params: Parameter values ``name -> tensor`` to evaluate at (default: the model's).

    Returns:
        ``name -> (numel, numel)`` GGN block for every parameter.
    """
    params = _detached_params(model, params)
    output = functional_call(model, params, (x,))
    loss_hessians = per_sample_output_hessians(output, y, loss_fn)  # (N, D, D)
    n, d = loss_hessians.shape[:2]
    blocks: dict[str, Tensor] = {}
    for name, value in params.items():

        def output_of(theta: Tensor, name: str = name) -> Tensor:
            return functional_call(model, {**params, name: theta}, (x,))

        jac = jacrev(output_of)(value).reshape(n, d, value.numel())
        blocks[name] = torch.einsum("ndi,nde,nej->ij", jac, loss_hessians, jac)
    return blocks


def modify_eigenvalues(matrix: Tensor, mode: str) -> Tensor:
    """Modify a symmetric residual matrix ``R`` for a curvature recursion.

    With ``R = V diag(lambda) V^T`` (``torch.linalg.eigh`` of ``(R + R^T) / 2``)::

        identity: R                       (Hessian)
        zero:     0                       (GGN)
        abs:      V diag(|lambda|) V^T    (PCH, absolute values)
        clip:     V diag(max(lambda, 0)) V^T   (PCH, clipped)

    Args:
        matrix: Square symmetric matrix ``R``.
        mode: One of ``"identity"``, ``"zero"``, ``"abs"``, ``"clip"``.

    Returns:
        The modified matrix, same shape as ``matrix``.

    Raises:
        ValueError: If ``mode`` is unknown.
    """
    if mode == "identity":
        return matrix
    if mode == "zero":
        return torch.zeros_like(matrix)
    if mode not in ("abs", "clip"):
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODIFICATIONS}")
    evals, evecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    evals = evals.abs() if mode == "abs" else evals.clamp(min=0)
    return (evecs * evals) @ evecs.T


def _call_with_param(
    theta: Tensor, module: nn.Module, params: dict[str, Tensor], name: str, layer_in: Tensor
) -> Tensor:
    """Layer output ``f(layer_in; theta)`` with parameter ``name`` replaced by ``theta``."""
    return functional_call(module, {**params, name: theta}, (layer_in,))


def _call_with_input(t: Tensor, module: nn.Module, params: dict[str, Tensor]) -> Tensor:
    """Layer output ``f(t; params)``."""
    return functional_call(module, params, (t,))


def _jacobian_and_residual(
    fn: Callable[[Tensor], Tensor], point: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor]:
    """Jacobian and residual of ``y = fn(u)`` at ``u = point`` for output gradient ``g``.

    ::

        J = dy / du            (D_y, numel(u))   by torch.func.jacrev
        R = sum_k g_k d2 y_k / du2   (numel(u), numel(u))   by torch.func.hessian of (g * y).sum()
    """

    def weighted(u: Tensor) -> Tensor:
        return (grad_out * fn(u).reshape(-1)).sum()

    jac = jacrev(fn)(point).reshape(grad_out.numel(), point.numel())
    residual = hessian(weighted)(point).reshape(point.numel(), point.numel())
    return jac, residual


def _blocks_sequential(
    layers: Sequence[tuple[str, nn.Module]],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    mode: str,
) -> dict[str, Tensor]:
    """Run the layer-wise curvature recursion (Dangel et al. 2020) for a batch of size 1.

    Starting from ``P_out = d2L / dz2`` and ``g_out = dL/dz`` at the network output, walk the
    layers ``y = f(x; theta)`` backwards::

        P_theta = J_theta^T P_y J_theta + mod(R_theta),  R_theta = sum_k g_k d2 y_k / dtheta2
        P_x     = J_x^T     P_y J_x     + mod(R_x),      R_x     = sum_k g_k d2 y_k / dx2
        g_x     = J_x^T g_y

    ``J`` by ``torch.func.jacrev`` of the layer function (``functional_call`` for
    parameters), ``R`` by ``torch.func.hessian`` of ``(g_y * f(.)).sum()``, ``mod`` by
    :func:`modify_eigenvalues`.
    """
    if x.shape[0] != 1:
        raise ValueError(f"the sequential recursion needs batch size 1, got {x.shape[0]}")
    if mode not in MODIFICATIONS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODIFICATIONS}")
    layers = list(layers)

    inputs: list[Tensor] = []
    hidden = x.detach()
    with torch.no_grad():
        for _, module in layers:
            inputs.append(hidden)
            hidden = module(hidden)

    def loss_of(z: Tensor) -> Tensor:
        return loss_fn(z, y)

    dim = hidden.numel()
    grad_out = jacrev(loss_of)(hidden).reshape(dim)  # g_y = dL/dy, flattened
    curv_out = hessian(loss_of)(hidden).reshape(dim, dim)  # P_y

    blocks: dict[str, Tensor] = {}
    for index in reversed(range(len(layers))):
        prefix, module = layers[index]
        layer_in = inputs[index]
        params = _detached_params(module, None)

        for name, value in params.items():
            fn = functools.partial(
                _call_with_param, module=module, params=params, name=name, layer_in=layer_in
            )
            jac, residual = _jacobian_and_residual(fn, value, grad_out)
            key = f"{prefix}.{name}" if prefix else name
            blocks[key] = jac.T @ curv_out @ jac + modify_eigenvalues(residual, mode)

        if index == 0:
            break
        fn = functools.partial(_call_with_input, module=module, params=params)
        jac_x, residual_x = _jacobian_and_residual(fn, layer_in, grad_out)
        curv_out = jac_x.T @ curv_out @ jac_x + modify_eigenvalues(residual_x, mode)
        grad_out = jac_x.T @ grad_out
    return blocks


def pch_blocks_sequential(
    layers: Sequence[tuple[str, nn.Module]],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    mode: str,
) -> dict[str, Tensor]:
    """Positive-curvature Hessian (PCH) blocks of a sequential model, batch size 1.

    The PCH of Dangel, Harmeling & Hennig (arXiv 1902.01813): from ``P_out = d2L / dz2``,
    walking the layers ``y = f(x; theta)`` backwards with ``g_y = dL/dy``::

        P_theta = J_theta^T P_y J_theta + mod(R_theta),  R_theta = sum_k g_k d2 y_k / dtheta2
        P_x     = J_x^T     P_y J_x     + mod(R_x),      R_x     = sum_k g_k d2 y_k / dx2

    where ``mod`` replaces the eigenvalues ``lambda`` of ``R`` by ``|lambda|`` (``"abs"``)
    or ``max(lambda, 0)`` (``"clip"``). Every ``J`` is a ``torch.func.jacrev`` of the layer,
    every ``R`` a ``torch.func.hessian`` of ``(g * f(.)).sum()``.

    Args:
        layers: ``(name_prefix, module)`` pairs in forward order, e.g.
            ``list(sequential.named_children())``; block keys are ``"{prefix}.{name}"``.
        x: Input of batch size 1, shape ``(1, ...)``.
        y: Target for that single sample.
        loss_fn: ``loss_fn(output, y) -> scalar``.
        mode: ``"abs"`` or ``"clip"``.

    Returns:
        ``full parameter name -> (numel, numel)`` PCH block.

    Raises:
        ValueError: If the batch size is not 1 or ``mode`` is not ``"abs"``/``"clip"``.
    """
    if mode not in ("abs", "clip"):
        raise ValueError(f"PCH mode must be 'abs' or 'clip', got {mode!r}")
    return _blocks_sequential(layers, x, y, loss_fn, mode)


def hessian_blocks_sequential(
    layers: Sequence[tuple[str, nn.Module]],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Hessian blocks of a sequential model via the layer recursion, batch size 1.

    Same recursion as :func:`pch_blocks_sequential` with ``mod(R) = R``::

        H_theta = J_theta^T H_y J_theta + R_theta,   H_x = J_x^T H_y J_x + R_x.

    Must equal :func:`hessian_blocks` (exact for chains without fan-out).

    Args:
        layers: ``(name_prefix, module)`` pairs in forward order.
        x: Input of batch size 1, shape ``(1, ...)``.
        y: Target for that single sample.
        loss_fn: ``loss_fn(output, y) -> scalar``.

    Returns:
        ``full parameter name -> (numel, numel)`` Hessian block.

    Raises:
        ValueError: If the batch size is not 1.
    """
    return _blocks_sequential(layers, x, y, loss_fn, "identity")


def ggn_blocks_sequential(
    layers: Sequence[tuple[str, nn.Module]],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """GGN blocks of a sequential model via the layer recursion, batch size 1.

    Same recursion as :func:`pch_blocks_sequential` with ``mod(R) = 0``::

        G_theta = J_theta^T G_y J_theta,   G_x = J_x^T G_y J_x,   G_out = d2L / dz2,

    i.e. ``J^T (d2L / dz2) J``. Must equal :func:`ggn_blocks`.

    Args:
        layers: ``(name_prefix, module)`` pairs in forward order.
        x: Input of batch size 1, shape ``(1, ...)``.
        y: Target for that single sample.
        loss_fn: ``loss_fn(output, y) -> scalar``.

    Returns:
        ``full parameter name -> (numel, numel)`` GGN block.

    Raises:
        ValueError: If the batch size is not 1.
    """
    return _blocks_sequential(layers, x, y, loss_fn, "zero")
