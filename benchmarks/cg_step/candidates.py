"""The seed problem of the ``cg_step`` section and the calls it times."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

import curvgraph
from benchmarks.foundation.runner import load_batch

__all__ = ["CG_NEWTON", "SGD", "BATCH", "CANDIDATES", "SeedCalls"]

CG_NEWTON = dict(lr=0.1, alpha=0.02, cg_atol=0.0, cg_tol=0.1, cg_maxiter=50)
SGD = dict(lr=0.1)
BATCH = 500
CANDIDATES = (
    "sgd_step",
    "cgnewton_step",
    "cgnewton_step_compiled",
    "sgd_iteration",
    "cgnewton_iteration",
    "cgnewton_iteration_compiled",
    "product",
    "output_hessian_floor",
    "hbp_block_floor",
)


class SeedCalls:
    """The seed model, its traced graph, one batch, and the calls of :data:`CANDIDATES`.

    Every setup restores the initial parameters, so every call sees the same gradients,
    curvature and CG iterations.
    """

    def __init__(self, device: str = "cpu"):
        torch.manual_seed(0)
        self.model = nn.Linear(784, 10).to(device)
        self.x, self.y = load_batch(BATCH, torch.device(device))
        self.graph = curvgraph.trace(self.model)
        params = list(self.model.parameters())
        self.sgd = torch.optim.SGD(params, **SGD)
        self.newton = curvgraph.optim.CGNewton(params, **CG_NEWTON)
        self.compiled = curvgraph.optim.CGNewton(params, **CG_NEWTON, compile=True)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.restore()
        self.curvature = self.backward()
        alpha = CG_NEWTON["alpha"]
        self.vector = {n: -p.grad.clone() for n, p in self.model.named_parameters()}

        def product():
            products = self.curvature.matvec(self.vector)
            return {n: (1 - alpha) * products[n] + alpha * v for n, v in self.vector.items()}

        self.product = product
        logits = self.graph(self.x).detach()

        def output_hessian_floor():
            """The cross-entropy's output Hessian in closed form (benchmarks/cg_step/floors)."""
            p = torch.softmax(logits.T.contiguous(), dim=0).T
            return (torch.diag(p.sum(0)) - p.T @ p) * (1.0 / BATCH)

        self.output_hessian_floor = output_hessian_floor
        self.hbp_block_floor = lambda: self.x.mean(0)  # the weight block's input factor

    def restore(self) -> None:
        """The initial parameters, in place (the optimizers keep their references)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.initial[name])

    def backward(self):
        """Forward, backward and the HBP GGN pass (the seed's spelling); the blocks."""
        self.model.zero_grad()
        out = self.graph(self.x)
        loss = nn.functional.cross_entropy(out, self.y)
        hessian = curvgraph.loss_hessian(loss, out)
        loss.backward()
        return self.graph.backward_hessian(hessian, modify_2nd_order_terms="zero")

    def sgd_iteration(self) -> None:
        """Forward, backward and the SGD step of the plain model."""
        self.sgd.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.sgd.step()

    def plan(self) -> Dict[str, Tuple[Callable, Optional[Callable]]]:
        """``name -> (fn, setup)`` for :func:`benchmarks.timing.measure_interleaved`."""
        fixed = self._fixed_gradients
        return {
            "sgd_step": (lambda _: self.sgd.step(), fixed),
            "cgnewton_step": (lambda _: self.newton.step(self.curvature), fixed),
            "cgnewton_step_compiled": (lambda _: self.compiled.step(self.curvature), fixed),
            "sgd_iteration": (lambda _: self.sgd_iteration(), self.restore),
            "cgnewton_iteration": (lambda _: self.newton.step(self.backward()), self.restore),
            "cgnewton_iteration_compiled": (
                lambda _: self.compiled.step(self.backward()),
                self.restore,
            ),
            "product": (lambda: self.product(), None),
            "output_hessian_floor": (lambda: self.output_hessian_floor(), None),
            "hbp_block_floor": (lambda: self.hbp_block_floor(), None),
        }

    def _fixed_gradients(self) -> None:
        """Restore the parameters and the gradients of the initial point (untimed)."""
        self.restore()
        for name, p in self.model.named_parameters():
            p.grad = -self.vector[name].clone()

    def iterations(self) -> Dict[str, int]:
        """CG iterations per block of one step from the initial point (lockstep: the max)."""
        self._fixed_gradients()
        self.newton.step(self.curvature)
        names = dict(self.model.named_parameters())
        return {n: int(self.newton.state[p]["cg_iterations"]) for n, p in names.items()}
