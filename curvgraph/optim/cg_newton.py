"""CG-Newton on block curvature (design 3.6; the bpexts ``CGNewton`` parametrization)."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from curvgraph.curvature import BlockCurvature
from curvgraph.solvers import cg

__all__ = ["CGNewton"]


class CGNewton(torch.optim.Optimizer):
    """Newton steps with block curvature, each block's system solved by CG.

    For every parameter ``theta`` with gradient ``g`` and curvature block ``C``:

        [(1 - alpha) C + alpha I] d = -g,      theta <- theta + lr d,

    with ``d`` from CG started at zero and stopped when
    ``||r|| <= max(cg_tol ||g||, cg_atol)`` or after ``cg_maxiter`` iterations. All blocks
    of a parameter group are solved in one lockstep CG loop whose matrix-vector product is
    one batched call over the blocks. On indefinite curvature (``curvature="hessian"``) a
    block's CG stops at the first ``p^T A p <= 0`` (see :func:`curvgraph.solvers.cg`);
    a non-finite direction is never applied.

    Args:
        params: parameters or parameter groups (``lr``, ``alpha``, ``cg_*`` per group).
        lr: step size.
        alpha: damping, ``0 <= alpha < 1`` (interpolates between Newton and gradient).
        cg_atol: absolute CG tolerance.
        cg_tol: CG tolerance relative to ``||g||``.
        cg_maxiter: CG iterations per step and block.

    ``state[p]`` holds ``cg_iterations``, ``cg_residual`` and ``nonpositive_curvature`` of
    the last step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        alpha: float = 0.02,
        cg_atol: float = 0.0,
        cg_tol: float = 0.1,
        cg_maxiter: int = 50,
    ):
        defaults = dict(lr=lr, alpha=alpha, cg_atol=cg_atol, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (its own ``lr``, ``alpha``, ``cg_*`` are validated like the defaults)."""
        super().add_param_group(param_group)
        _validate(self.param_groups[-1])

    @torch.no_grad()
    def step(self, curvature: BlockCurvature, closure=None):
        """Take one step with the blocks of ``curvature`` (one per parameter with a gradient).

        Args:
            curvature: e.g. ``cg.backward_hessian(...)`` for the current batch.
            closure: optional; re-evaluates the loss, returned as in ``torch.optim``.
        """
        if not isinstance(curvature, BlockCurvature):
            raise TypeError(f"step expects a BlockCurvature, got {type(curvature).__name__}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = curvature.name_of(p)
                if name is None:
                    raise ValueError(
                        f"the curvature has no block for a parameter of shape {tuple(p.shape)}; "
                        f"it covers {list(curvature)}. Compute it for the same model whose "
                        "parameters this optimizer updates (parameters with requires_grad=False "
                        "get no block: leave them out of the optimizer)."
                    )
                params[name] = p
            if params:
                self._update_group(group, params, curvature)
        return loss

    def _update_group(self, group, params, curvature: BlockCurvature) -> None:
        alpha = group["alpha"]

        def damped(vectors):
            products = curvature.matvec(vectors)
            return {n: (1 - alpha) * products[n] + alpha * v for n, v in vectors.items()}

        flags = torch.stack([torch.isfinite(p.grad).all() for p in params.values()]).tolist()
        finite = dict(zip(params, flags))
        for name in [n for n, ok in finite.items() if not ok]:
            warnings.warn(
                f"CGNewton: the gradient of {name!r} contains NaN/inf; parameter left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
            del params[name]
        if not params:
            return
        negative_grads = {n: -p.grad for n, p in params.items()}
        directions, info = cg(
            damped,
            negative_grads,
            tol=group["cg_tol"],
            atol=group["cg_atol"],
            maxiter=group["cg_maxiter"],
        )
        iterations = info.iterations.tolist()
        residuals = info.residual_norm.tolist()
        nonpositive = info.nonpositive_curvature.tolist()
        finite = torch.stack([torch.isfinite(d).all() for d in directions.values()]).tolist()
        for i, (name, p) in enumerate(params.items()):
            direction = directions[name]
            state = self.state[p]
            state["cg_iterations"] = iterations[i]
            state["cg_residual"] = residuals[i]
            state["nonpositive_curvature"] = nonpositive[i]
            if not finite[i]:
                warnings.warn(
                    f"CGNewton: non-finite direction for {name!r} skipped (curvature or "
                    "gradient contains NaN/inf)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            p.add_(direction, alpha=group["lr"])


def _validate(group: dict) -> None:
    if not group["lr"] > 0:
        raise ValueError(f"lr must be positive, got {group['lr']}")
    if not 0 <= group["alpha"] < 1:
        raise ValueError(f"alpha must lie in [0, 1), got {group['alpha']}")
    if not group["cg_maxiter"] >= 1:
        raise ValueError(f"cg_maxiter must be >= 1, got {group['cg_maxiter']}")
    if not (group["cg_tol"] >= 0 and group["cg_atol"] >= 0):
        raise ValueError("cg_tol and cg_atol must be >= 0")
