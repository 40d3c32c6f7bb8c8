"""Problems and the timed callables of the ekfac section."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

import curvgraph
from benchmarks.problems import get

__all__ = ["CANDIDATES", "DAMPING", "PROBLEMS", "build", "candidates"]

#: problem -> batch size
PROBLEMS = {"mnist_mlp": 128, "cifar10_3c3d": 64}
#: Fisher types: curvgraph's ``mc_samples`` and curvlinops' ``fisher_type``
FISHERS = {"mc": 1, "type-2": 0}
DAMPING = 1e-3
CANDIDATES = (
    "gradient",
    "cg_fit_mc",
    "curvlinops_fit_mc",
    "cg_fit_type-2",
    "curvlinops_fit_type-2",
    "cg_solve",
    "curvlinops_solve",
)


def build(problem: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (float32, seed 0) and one batch."""
    torch.manual_seed(0)
    spec = get(problem)
    x, y = spec.batch(PROBLEMS[problem])
    return spec.model(), x, y


def candidates(problem: str, only=None) -> Dict[str, Callable[[], object]]:
    """Name -> a callable doing one measured computation (set up: ``only`` or all).

    ``*_fit_*``: the EK-FAC of the batch from scratch (forward, backward where the method
    needs it, Kronecker factors, their eigendecompositions, the refit); ``*_solve``: one
    damped inverse product ``(C + lambda I)^{-1} v`` over all parameters with the fit done.
    """
    model, x, y = build(problem)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params))
    vectors = dict(zip(names, v.split([p.numel() for p in params])))
    vectors = {n: t.reshape(p.shape) for (n, t), p in zip(vectors.items(), params)}
    cg = curvgraph.trace(model)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def ours(fisher):
        out = cg(x)
        options = {"mc_samples": FISHERS[fisher], "generator": torch.Generator().manual_seed(0)}
        return cg.curvature(loss_fn(out, y), out, method="ekfac", **options)

    def peer(fisher):
        import curvlinops

        operator = curvlinops.EKFACLinearOperator(
            model, loss_fn, params, [(x, y)], fisher_type=fisher, check_deterministic=False
        )
        operator.compute_kronecker_factors()
        operator.compute_eigenvalue_correction()
        return operator

    def our_solve():
        curv = ours("mc")
        return lambda: {name: block.solve(vectors[name], DAMPING) for name, block in curv.items()}

    def peer_solve():
        import curvlinops

        inverse = curvlinops.KFACInverseLinearOperator(
            peer("mc"), damping=DAMPING, use_exact_damping=True
        )
        inverse @ v  # the first product caches the inverted eigenvalues
        return lambda: inverse @ v

    factories = {
        "gradient": lambda: gradient,
        "cg_fit_mc": lambda: lambda: ours("mc"),
        "curvlinops_fit_mc": lambda: lambda: peer("mc"),
        "cg_fit_type-2": lambda: lambda: ours("type-2"),
        "curvlinops_fit_type-2": lambda: lambda: peer("type-2"),
        "cg_solve": our_solve,
        "curvlinops_solve": peer_solve,
    }
    return {name: factories[name]() for name in (only or CANDIDATES)}
